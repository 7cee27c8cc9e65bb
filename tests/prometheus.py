"""A real Prometheus server for the tests: Debian's ``/usr/bin/prometheus`` scraping a
Zarkov web service's ``/metrics``, and its HTTP API to read what it scraped.

``make test`` installs the package (scripts/prometheus-deps) when run as root.  Each
server is a process of the test's :class:`tests.support.Processes` (``procs``), so it
is stopped at teardown whatever happened; it listens on a loopback port of its own
and keeps its config and database under the test's tmp dir.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any, Callable, Optional

import yaml

from tests.support import Processes, free_port, wait_for
from tests.webtools import get

PROMETHEUS = "/usr/bin/prometheus"

#: Seconds between two scrapes of every target (and the most one scrape may take).
SCRAPE_INTERVAL = 1


def prometheus_missing() -> Optional[str]:
    """Why the Prometheus tests cannot run here, or None when they can."""
    if os.path.exists(PROMETHEUS):
        return None
    how = ("make test installs the Debian package prometheus when run as root"
           if os.geteuid() != 0 else "run 'make prometheus' (apt-get install prometheus)")
    return f"{PROMETHEUS} is not installed ({how})"


def zarkov_job(web_port: int, token: Optional[str] = None, job: str = "zarkov") -> dict:
    """A scrape job for the Zarkov web service on 127.0.0.1:``web_port`` (its
    ``/metrics``), with ``Authorization: Bearer <token>`` when a token is given."""
    out: dict[str, Any] = {
        "job_name": job,
        "metrics_path": "/metrics",
        "scrape_interval": f"{SCRAPE_INTERVAL}s",
        "scrape_timeout": f"{SCRAPE_INTERVAL}s",
        "static_configs": [{"targets": [f"127.0.0.1:{web_port}"]}],
    }
    if token is not None:
        out["authorization"] = {"type": "Bearer", "credentials": token}
    return out


class Prometheus:
    """One running Prometheus server: ``url`` of its HTTP API, ``proc`` and ``name``
    (its log in the test's ``procs``)."""

    def __init__(self, procs: Processes, proc: subprocess.Popen, name: str, url: str):
        self.procs, self.proc, self.name, self.url = procs, proc, name, url

    def log(self) -> str:
        """What the server has written so far."""
        return self.procs.log(self.name)

    def api(self, path: str, **params: Any) -> Any:
        """The ``data`` of a successful answer of the API at ``path`` (``/api/v1/…``)."""
        r = get(self.url, path, **params)
        body = r.json()
        if r.status != 200 or body.get("status") != "success":
            raise AssertionError(f"prometheus {path} {params}: {r.status} {body}")
        return body["data"]

    def query(self, expr: str) -> Optional[float]:
        """The value now of the one series that ``expr`` gives (a scalar too), or None
        when it gives none; more than one series is an error."""
        data = self.api("/api/v1/query", query=expr)
        if data["resultType"] == "scalar":
            return float(data["result"][1])
        result = data["result"]
        if not result:
            return None
        if len(result) > 1 or data["resultType"] != "vector":
            raise AssertionError(f"{expr!r} gives {len(result)} series, not one: "
                                 f"{json.dumps(result)[:1000]}")
        return float(result[0]["value"][1])

    def targets(self) -> list[dict]:
        """The active scrape targets: ``labels``, ``health`` (``up``, ``down`` or
        ``unknown``), ``lastError``, ``lastScrape``…"""
        return self.api("/api/v1/targets", state="active")["activeTargets"]

    def target(self, job: str) -> Optional[dict]:
        """The active target of scrape job ``job``, or None while it has none."""
        found = [t for t in self.targets() if t["labels"].get("job") == job]
        assert len(found) <= 1, f"job {job!r} has {len(found)} targets"
        return found[0] if found else None

    def describe_targets(self) -> str:
        """A line per target: its job, health and last error (for failure messages)."""
        try:
            return "; ".join(f"{t['labels'].get('job')} {t['scrapeUrl']}: {t['health']}"
                             + (f" ({t['lastError']})" if t.get("lastError") else "")
                             for t in self.targets())
        except Exception as e:  # noqa: BLE001 - only for a message
            return f"(targets unknown: {e!r})"

    def wait_until(self, expr: str, ok: Callable[[Optional[float]], bool], what: str,
                   timeout: float = 60.0) -> Optional[float]:
        """Poll ``expr`` until ``ok(value)``; return that value, or fail after
        ``timeout`` seconds naming the last value and the targets' health."""
        deadline = time.monotonic() + timeout
        value: Optional[float] = None
        while True:
            self.check_running()
            value = self.query(expr)
            if ok(value):
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {expr} to be {what}: last "
                    f"value {value}; targets: {self.describe_targets()}")
            time.sleep(0.2)

    def wait_value(self, expr: str, expected: float, timeout: float = 60.0) -> float:
        """Poll ``expr`` until its one series has the value ``expected``."""
        self.wait_until(expr, lambda v: v == expected, f"{expected}", timeout)
        return expected

    def wait_target(self, job: str, health: str, timeout: float = 60.0) -> dict:
        """Poll until job ``job``'s target was scraped and is ``health`` (``up`` or
        ``down``); return the target."""
        def scraped() -> Optional[dict]:
            if self.proc.poll() is not None:
                return {"exited": True}
            t = self.target(job)
            return t if t is not None and t["health"] == health else None
        try:
            target = wait_for(scraped, timeout=timeout, interval=0.2,
                              what=f"the target of job {job!r} to be {health}")
        except AssertionError as e:
            raise AssertionError(f"{e}; targets: {self.describe_targets()}") from None
        self.check_running()
        return target

    def check_running(self) -> None:
        """Fail, with the end of its log, if the server has exited."""
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with status {self.proc.returncode}: "
                                 f"{self.log()[-3000:]}")


def start_prometheus(procs: Processes, tmp_dir: str, jobs: list[dict],
                     name: str = "prometheus", timeout: float = 60.0) -> Prometheus:
    """Start ``/usr/bin/prometheus`` scraping ``jobs`` (see :func:`zarkov_job`) on a
    free loopback port, its config and database in ``tmp_dir``; return once it is
    ready (``/-/ready`` answers 200)."""
    home = os.path.join(tmp_dir, name)
    os.makedirs(home, exist_ok=True)
    config = os.path.join(home, "prometheus.yml")
    with open(config, "w") as f:
        yaml.safe_dump({"global": {"scrape_interval": f"{SCRAPE_INTERVAL}s",
                                   "evaluation_interval": f"{SCRAPE_INTERVAL}s"},
                        "scrape_configs": jobs}, f)
    port = free_port()
    proc = procs.start(name, [PROMETHEUS, f"--config.file={config}",
                              f"--storage.tsdb.path={os.path.join(home, 'data')}",
                              f"--web.listen-address=127.0.0.1:{port}"], cwd=home)
    server = Prometheus(procs, proc, name, f"http://127.0.0.1:{port}")

    def ready() -> bool:
        if proc.poll() is not None:
            return True  # said below
        try:
            return get(server.url, "/-/ready").status == 200
        except OSError:  # not listening yet
            return False
    try:
        wait_for(ready, timeout=timeout, interval=0.1, what=f"prometheus ready on port {port}")
    except AssertionError as e:
        raise AssertionError(f"{e}; its log: {server.log()[-2000:]}") from None
    server.check_running()
    return server
