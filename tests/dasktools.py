"""Helpers of the Dask engine's tests: a Dask cluster of real processes (``dask
scheduler``, ``dask worker`` with 2 single-threaded worker processes) and the
standalone gateway (``python -m zarkov.dask_engine.gateway``) that answers the
router's protocol on ``zmr.req_bind``.

Which engines the parametrized tests run on: ``ZARKOV_TEST_ENGINES`` (comma
separated; default ``router,dask``, or ``router`` alone when Dask is not installed).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import yaml

from tests.support import Processes, free_port, wait_for, write_config

BIN = os.path.dirname(sys.executable)


def dask_installed() -> bool:
    """Whether dask and distributed can be imported here."""
    return all(importlib.util.find_spec(m) is not None for m in ("dask", "distributed"))


def engines() -> list[str]:
    """The engines that parametrized tests run on (see the module docstring)."""
    default = "router,dask" if dask_installed() else "router"
    return [e for e in os.environ.get("ZARKOV_TEST_ENGINES", default).split(",") if e]


def worker_pids_of(status: dict) -> list[int]:
    """The Dask worker processes' pids from a gateway's ``status`` reply."""
    return [p for p in status.get("worker_pids", []) if p]


class DaskCluster:
    """A scheduler and a ``dask worker`` process with ``workers`` worker processes
    (under nannies, which start a killed one again), on loopback ports of their own."""

    def __init__(self, procs: Processes, workers: int = 2):
        self.procs = procs
        self.n_workers = workers
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler = self.workers = None
        self._starts = 0

    def start_scheduler(self) -> None:
        """Start ``dask scheduler``; return once a Client can reach it."""
        self._starts += 1
        self.scheduler = self.procs.start(
            f"dask-scheduler{self._starts}",
            [os.path.join(BIN, "dask"), "scheduler", "--host", "127.0.0.1", "--port",
             str(self.port), "--no-dashboard", "--no-show"])
        wait_for(self._reachable, timeout=60, what=f"the Dask scheduler at {self.address}")

    def _reachable(self) -> bool:
        import socket
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def start_workers(self) -> None:
        """Start ``dask worker`` (2 processes); return once the scheduler has them."""
        self.workers = self.procs.start(
            f"dask-worker{self._starts}",
            [os.path.join(BIN, "dask"), "worker", self.address, "--nworkers",
             str(self.n_workers), "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"])
        wait_for(lambda: self.worker_count() >= self.n_workers, timeout=60,
                 what=f"{self.n_workers} Dask workers")

    def worker_count(self) -> int:
        """Workers the scheduler knows (asked through a short-lived Client)."""
        from distributed import Client
        with Client(self.address, timeout=5, set_as_default=False) as c:
            return len(c.scheduler_info().get("workers", {}))

    def start(self) -> "DaskCluster":
        """The scheduler, then the workers."""
        self.start_scheduler()
        self.start_workers()
        return self


class Gateway:
    """A standalone gateway at the config's ``zmr.req_bind`` (the router's protocol)."""

    def __init__(self, procs: Processes, path: str, name: str = "gateway"):
        from zarkov import wire
        with open(path) as f:
            self.uri = yaml.safe_load(f)["zmr"]["req_uri"]
        self.proc = procs.start(name, [sys.executable, "-m", "zarkov.dask_engine.gateway",
                                       "-y", path])
        wait_for(lambda: wire.request(self.uri, {"$command": "status"}, 2.0).get("connected"),
                 timeout=60, what="the Dask gateway to connect to its scheduler")

    def status(self) -> dict:
        """The reply to ``status`` without a job id."""
        from zarkov import wire
        return wire.request(self.uri, {"$command": "status"}, 10.0)


class DaskAggCluster:
    """What conftest's ``shared_cluster`` is on the Dask engine: a Dask cluster, and a
    config whose ``zcmd aggregate`` runs its jobs there (through its own gateway)."""

    engine = "dask"

    def __init__(self, procs: Processes, base: dict, tmp: str):
        self.dask = DaskCluster(procs).start()
        cfg = dask_config({**base, "agg_lease_seconds": 30}, self.dask.address)
        cfg["zmr"]["max_chunk_timeout"] = 4
        self.path = write_config(os.path.join(tmp, "zarkov.yaml"), cfg)

    def jobs_known(self) -> None:
        """The jobs are each zcmd's gateway's, gone with it: not counted here."""
        return None

    def wait_idle(self, timeout: float = 60) -> None:
        """Nothing to wait for: only a gateway writes, and it ends with its zcmd."""


def make_tls(tmp, addresses: tuple[str, ...] = ("127.0.0.1",)) -> tuple[str, str, str]:
    """A CA and one certificate for ``addresses`` signed by it (openssl), as PEM files:
    (CA, certificate, key).  ``tmp`` is a pathlib directory."""
    ca_key, ca, key, csr, cert = (str(tmp / n) for n in
                                  ("ca.key", "ca.pem", "host.key", "host.csr", "host.pem"))
    ext = tmp / "ext.cnf"
    ext.write_text("subjectAltName=" + ",".join(f"IP:{a}" for a in addresses)
                   + ",DNS:localhost\n")
    for argv in (["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out",
                  ca, "-days", "2", "-subj", "/CN=zarkov-test-ca"],
                 ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj",
                  f"/CN={addresses[0]}"],
                 ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
                  "-out", cert, "-days", "2", "-extfile", str(ext)]):
        subprocess.run(["openssl", *argv], check=True, capture_output=True, timeout=60)
    return ca, cert, key


def dask_config(base: dict, scheduler: str) -> dict:
    """``base`` (a test config dict) with the Dask engine on ``scheduler``."""
    return {**base, "zmr": {**base["zmr"], "engine": "dask", "dask_scheduler": scheduler}}


__all__ = ["DaskCluster", "Gateway", "dask_config", "dask_installed", "engines",
           "make_tls", "worker_pids_of", "free_port"]
