"""Prometheus ``/metrics``: every endpoint scraped after known actions and parsed with
prometheus_client's own parser; the numbers are the ones the actions made.

The web service of ``zcmd serve`` (events, the router, the AggDefs' runs and lag, its
own requests), then the event logger, router and worker pool run apart on their own
``metrics.*_port``, and the access rules (token, loopback host names, the bind).
"""
from __future__ import annotations

import urllib.request

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.aggtools import ENV, register
from tests.strategies import fuzz_settings
from tests.support import Cluster, free_port, run_zcmd, wait_for
from tests.webtools import get, request, start_serve, web_base
from zarkov.histogram import cumulative
from zarkov.security import host_name, is_loopback_host

TOKEN = "a-long-enough-token-for-tests"
TYPES = "my.more.CountTypes"


def scrape(url: str, token: str | None = None) -> dict:
    """``{(name, ((label, value), ...)): value}`` of every sample at ``url``."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                 if token else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float | None:
    """One sample's value (None when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def send(uri: str, n: int, kind: str = "tick") -> None:
    from zarkov.client import ZarkovClient
    client = ZarkovClient(uri)
    for i in range(n):
        client.event(kind, {"i": i})
    client.close()


def test_the_histogram_buckets_are_cumulative_as_prometheus_reads_them():
    assert cumulative([0.1, 1.0], [2, 0, 3]) == [("0.1", 2), ("1.0", 2), ("+Inf", 5)]


def test_serves_metrics_count_events_runs_lag_router_and_requests(procs, config_file, zconfig,
                                                                   db):
    path = config_file()
    start_serve(procs, path, zconfig, "serve", "--no-realtime", env=ENV)
    base = web_base(zconfig)
    register(db, "types", TYPES)
    register(db, "broken_agg", "my.no_such_module.Task")
    send(zconfig["bson_uri"], 120)
    wait_for(lambda: db.event.count_documents({}) == 120, what="120 events stored")
    url = base + "/metrics"
    m = wait_for(lambda: (s := scrape(url)) and value(
        s, "zarkov_events_total", server="0", outcome="committed") == 120
        and value(s, "zarkov_router_workers") == 2 and s,
        what="the stats to say 120 committed and the router 2 workers")
    assert value(m, "zarkov_events_total", server="0", outcome="accepted") == 120
    assert value(m, "zarkov_event_server_up", server="0") == 1
    assert value(m, "zarkov_event_commit_seconds_count", server="0") >= 1
    assert value(m, "zarkov_aggdef_events_waiting", aggdef="types") == 120
    assert value(m, "zarkov_aggdef_oldest_waiting_seconds", aggdef="types") > 0
    assert value(m, "zarkov_aggdef_runs_total", aggdef="types", outcome="ok") == 0
    assert value(m, "zarkov_router_up") == 1

    assert run_zcmd(path, "aggregate", "types", env=ENV, timeout=120).returncode == 0
    assert run_zcmd(path, "aggregate", "broken_agg", env=ENV, timeout=60).returncode == 2
    assert db["zagg.types"].find_one({"_id": "tick"})["value"] == 120
    get(base, "/aggdefs")
    get(base, "/nowhere")
    m = scrape(url)
    assert value(m, "zarkov_aggdef_events_waiting", aggdef="types") == 0
    assert value(m, "zarkov_aggdef_oldest_waiting_seconds", aggdef="types") == 0
    assert value(m, "zarkov_aggdef_runs_total", aggdef="types", outcome="ok") == 1
    assert value(m, "zarkov_aggdef_events_counted_total", aggdef="types") == 120
    assert value(m, "zarkov_aggdef_run_seconds_count", aggdef="types") == 1
    assert value(m, "zarkov_aggdef_run_seconds_bucket", aggdef="types", le="+Inf") == 1
    assert value(m, "zarkov_aggdef_runs_total", aggdef="broken_agg", outcome="failed") == 1
    assert value(m, "zarkov_aggdef_last_success_timestamp_seconds", aggdef="types") > 0
    assert value(m, "zarkov_router_jobs_finished_total", state="complete") >= 1
    assert value(m, "zarkov_web_requests_total", route="/aggdefs", status="200") == 1
    assert value(m, "zarkov_web_requests_total", route="unmatched", status="404") == 1
    assert value(m, "zarkov_database_up") == 1


def test_the_event_logger_router_and_workers_run_apart_serve_their_own(procs, config_file,
                                                                       zconfig, db):
    ports = {"eventlog_port": free_port(), "router_port": free_port(),
             "worker_port": free_port()}
    path = config_file(metrics=ports)
    Cluster(procs, path, workers=2).start()
    procs.zcmd("eventlog", path, "eventlog")
    register(db, "types", TYPES)
    wait_for(lambda: request(f"http://127.0.0.1:{ports['eventlog_port']}", "GET",
                             "/metrics").status == 200, what="the event logger's /metrics")
    send(zconfig["bson_uri"], 300, "apart")
    wait_for(lambda: db.event.count_documents({}) == 300, what="300 events stored")
    assert run_zcmd(path, "aggregate", "types", env=ENV, timeout=120).returncode == 0

    events = wait_for(lambda: (s := scrape(f"http://127.0.0.1:{ports['eventlog_port']}/metrics"))
                      and total(s, "zarkov_events_total", outcome="committed") == 300 and s,
                      what="the event logger's metrics to say 300")
    assert total(events, "zarkov_events_total", outcome="rejected") == 0
    assert total(events, "zarkov_journal_backlog_files") == 0
    router = scrape(f"http://127.0.0.1:{ports['router_port']}/metrics")
    assert value(router, "zarkov_router_workers") == 2
    assert value(router, "zarkov_router_jobs_finished_total", state="complete") == 1
    assert value(router, "zarkov_router_jobs", state="complete") == 1
    assert value(router, "zarkov_router_task_retries_total", reason="time_limit") == 0
    workers = wait_for(lambda: (s := scrape(f"http://127.0.0.1:{ports['worker_port']}/metrics"))
                       and value(s, "zarkov_worker_documents_mapped_total") == 300 and s,
                       what="the workers' metrics to say 300 mapped")
    assert value(workers, "zarkov_worker_processes") == 2
    assert total(workers, "zarkov_worker_tasks_total", outcome="ok") >= 1
    assert total(workers, "zarkov_worker_tasks_total", outcome="failed") == 0


def test_metrics_need_the_token_when_one_is_set_and_a_loopback_host_without(
        procs, config_file, zconfig):
    port = free_port()
    path = config_file(web_token=TOKEN, metrics={"router_port": port})
    start_serve(procs, path, zconfig, "serve", "--no-eventlog", "--no-realtime")
    for url in (web_base(zconfig) + "/metrics", f"http://127.0.0.1:{port}/metrics"):
        with pytest.raises(urllib.error.HTTPError) as e:
            scrape(url)
        assert e.value.code == 401
        assert value(scrape(url, TOKEN), "zarkov_build_info",
                     version=__import__("zarkov").__version__) == 1


def test_without_a_token_only_loopback_host_names_are_answered(procs, config_file):
    port = free_port()
    path = config_file(metrics={"router_port": port})
    Cluster(procs, path, workers=1).start()
    r = request(f"http://127.0.0.1:{port}", "GET", "/metrics",
                headers={"Host": f"attacker.example:{port}"})
    assert r.status == 403 and b"loopback" in r.body
    assert request(f"http://127.0.0.1:{port}", "GET", "/other").status == 404


def test_a_metrics_bind_beyond_loopback_without_a_token_exits_2_naming_the_key(config_file):
    path = config_file(metrics={"bind": "0.0.0.0", "router_port": free_port()})
    out = run_zcmd(path, "zmr-router", timeout=60)
    assert out.returncode == 2
    assert "web_token" in out.stderr and "metrics.bind" in out.stderr


@pytest.mark.fuzz
@fuzz_settings(300)
@given(path=st.just("/metrics") | st.text(max_size=30),
       host=st.sampled_from(["127.0.0.1:9", "[::1]:9", "localhost"]) | st.text(max_size=40),
       auth=st.just(f"Bearer {TOKEN}") | st.text(max_size=60),
       token=st.sampled_from([None, TOKEN]))
def test_fuzzed_requests_to_a_metrics_endpoint_get_one_of_its_answers(path, host, auth, token):
    from zarkov.metrics.endpoint import guarded
    app = guarded(lambda environ, start: (start("200 OK", []), [b"metrics\n"])[1], token)
    got = []
    body = app({"PATH_INFO": path, "HTTP_HOST": host, "HTTP_AUTHORIZATION": auth},
               lambda status, headers: got.append(status))
    assert len(got) == 1 and got[0][:3] in {"200", "401", "403", "404"}
    assert b"".join(body)
    if got[0].startswith("200"):  # only /metrics, with the token or a loopback Host
        assert path == "/metrics"
        if token:
            assert auth[:7].lower() == "bearer " and auth[7:].strip() == TOKEN
        else:
            assert is_loopback_host(host_name(host))
