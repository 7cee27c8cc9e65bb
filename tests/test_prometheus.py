"""A real Prometheus server scrapes `zcmd serve`'s /metrics (issue 18).

Debian's prometheus (installed by ``make test`` when root, scripts/prometheus-deps)
scrapes the web service every second; the test reads the series back through
Prometheus's HTTP API, as a dashboard or an alert rule would: the events stored, an
AggDef's lag before and after its run, the runs, and the target's health.  Skipped
only when /usr/bin/prometheus is not installed.
"""
from __future__ import annotations

import collections
from datetime import datetime, timedelta, timezone

import pytest

from tests.prometheus import prometheus_missing, start_prometheus, zarkov_job
from tests.support import run_zcmd, wait_for
from tests.webtools import start_serve
from zarkov.client import ZarkovClient

MISSING = prometheus_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

TOKEN = "a-long-enough-token-for-prometheus"

#: The article's way of defining AggDefs (README, "Using it"), with the examples'
#: tasks: ``per_day`` waits for `zcmd aggregate`, ``per_minute`` is real-time.
REGISTER = """\
from ming.orm import session
from zarkov import model as M

M.AggDef(name='per_day', task_name='zarkov.examples.EventsPerTypePerDay')
M.AggDef(name='per_minute', task_name='zarkov.examples.EventsPerTypePerMinute',
         realtime=True)
session(M.AggDef).flush()
"""


def register_aggdefs(path: str, tmp_path) -> None:
    script = tmp_path / "register.py"
    script.write_text(REGISTER)
    out = run_zcmd(path, "script", str(script), timeout=60)
    assert out.returncode == 0, out.stderr


def send_events(zconfig: dict, n: int, age: timedelta = timedelta(0)) -> collections.Counter:
    """Send ``n`` events with the client, timestamped ``age`` ago; their types counted."""
    when = datetime.now(timezone.utc) - age
    sent: collections.Counter = collections.Counter()
    with ZarkovClient(zconfig["bson_uri"], send_timeout=5.0) as client:
        for i in range(n):
            kind = ("login", "download", "create")[i % 3]
            assert client.event(kind, {"user": f"u{i % 7}"}, extra={"i": i}, timestamp=when)
            sent[kind] += 1
    return sent


def total(db, collection: str) -> int:
    return sum(d["value"] for d in db[collection].find())


def test_prometheus_reads_the_events_stored_and_the_lag_of_an_aggdef(
        procs, config_file, zconfig, db, tmp_path):
    n = 150
    path = config_file(realtime_interval=1)
    register_aggdefs(path, tmp_path)
    start_serve(procs, path, zconfig)
    prom = start_prometheus(procs, str(tmp_path), [zarkov_job(zconfig["web_port"])])
    send_events(zconfig, n, age=timedelta(hours=1))
    wait_for(lambda: db.event.count_documents({}) == n, timeout=60, what=f"{n} events stored")

    # The target is scraped and healthy (until /metrics exists: down, 404 in lastError).
    target = prom.wait_target("zarkov", "up")
    assert target["scrapeUrl"] == f"http://127.0.0.1:{zconfig['web_port']}/metrics"
    prom.wait_value('up{job="zarkov"}', 1)

    # Every event sent was accepted and stored, by the one event server (index 0).
    prom.wait_value('sum(zarkov_events_total{outcome="committed"})', n)
    prom.wait_value('zarkov_events_total{server="0", outcome="committed"}', n)
    prom.wait_value('sum(zarkov_events_total{outcome="accepted"})', n)
    for outcome in ("rejected", "duplicate", "refused"):
        assert (prom.query(f'sum(zarkov_events_total{{outcome="{outcome}"}})') or 0) == 0, \
            outcome

    # per_day is not real-time and has not run: all n wait, the oldest for an hour.
    prom.wait_value('zarkov_aggdef_events_waiting{aggdef="per_day"}', n)
    oldest = prom.query('zarkov_aggdef_oldest_waiting_seconds{aggdef="per_day"}')
    assert oldest is not None and 3600 <= oldest < 3600 + 600, oldest

    # per_minute is real-time: the loop of zcmd serve counts them within seconds.
    wait_for(lambda: total(db, "zagg.events_per_minute") == n, timeout=90,
             what="the real-time AggDef to count the events")
    prom.wait_value('zarkov_aggdef_events_waiting{aggdef="per_minute"}', 0)
    prom.wait_until('zarkov_aggdef_runs_total{aggdef="per_minute", outcome="ok"}',
                    lambda v: v is not None and v >= 1, "at least 1")

    # One run of per_day (cron's way): nothing waits any more, and the run is counted.
    out = run_zcmd(path, "aggregate", "per_day", timeout=120)
    assert out.returncode == 0, out.stderr
    assert total(db, "zagg.events_per_day") == n
    prom.wait_value('zarkov_aggdef_events_waiting{aggdef="per_day"}', 0)
    prom.wait_value('zarkov_aggdef_runs_total{aggdef="per_day", outcome="ok"}', 1)
    assert (prom.query('zarkov_aggdef_runs_total{aggdef="per_day", outcome="failed"}')
            or 0) == 0

    # The web service counts the requests it answered (start_serve's /health at least).
    prom.wait_until('sum(zarkov_web_requests_total{status="200"})',
                    lambda v: v is not None and v >= 1, "at least 1")
    prom.check_running()


def test_with_a_web_token_prometheus_scrapes_with_it_and_not_without(
        procs, config_file, zconfig, db, tmp_path):
    path = config_file(web_token=TOKEN)
    start_serve(procs, path, zconfig, "serve", "--no-realtime")
    port = zconfig["web_port"]
    prom = start_prometheus(procs, str(tmp_path), [
        zarkov_job(port, TOKEN), zarkov_job(port, job="no_token")])
    send_events(zconfig, 3)

    prom.wait_target("zarkov", "up")
    prom.wait_value('up{job="zarkov"}', 1)
    prom.wait_value('sum(zarkov_events_total{job="zarkov", outcome="committed"})', 3)
    # The same service without the token: refused, as its API is.
    refused = prom.wait_target("no_token", "down")
    assert "401" in refused["lastError"], refused
    prom.wait_value('up{job="no_token"}', 0)
