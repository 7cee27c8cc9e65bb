"""Metric families built from the snapshots each part keeps (nothing is counted twice:
a scrape reads the same numbers ``zcmd status`` and the dashboard show).

Each function takes plain data (JSON-ready dicts) and returns Prometheus metric
families, so that the web service and the endpoints of processes run apart build the
same series from the same kind of snapshot.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from zarkov import __version__
from zarkov.histogram import cumulative
from zarkov.lease import utc_seconds

#: The outcomes of ``zarkov_events_total`` and the stats fields they come from.
EVENT_OUTCOMES = (("accepted", "accepted"), ("rejected", "rejected"),
                  ("committed", "committed"), ("duplicate", "duplicates"),
                  ("refused", "refused"))
#: The worker task outcomes of ``zarkov_worker_tasks_total``.
TASK_OUTCOMES = ("ok", "failed")


def alive(pid: Any) -> bool:
    """Whether process ``pid`` runs on this host."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # another user's process: it runs
        return True
    return True


def build_info() -> list[Metric]:
    """``zarkov_build_info{version}`` 1: which Zarkov answers."""
    info = GaugeMetricFamily("zarkov_build_info", "The Zarkov version of this process.",
                             labels=["version"])
    info.add_metric([__version__], 1)
    return [info]


def _histogram(fam: HistogramMetricFamily, labels: list[str], h: Any) -> None:
    if isinstance(h, dict) and h.get("bounds") and h.get("counts"):
        fam.add_metric(labels, cumulative(h["bounds"], h["counts"]), float(h.get("sum", 0)))


def event_families(snapshots: Iterable[dict[str, Any]]) -> list[Metric]:
    """Event servers' counters from their stats snapshots (``server`` label: the index,
    ``web`` for the web service's intake, ``proxy`` for refusals counted by the
    parent of several servers)."""
    events = CounterMetricFamily("zarkov_events", "Events by outcome: accepted (journaled), "
                                 "rejected, committed (stored), duplicate (already stored: a "
                                 "replay), refused (connection without an authorised key).",
                                 labels=["server", "outcome"])
    up = GaugeMetricFamily("zarkov_event_server_up", "1 while the event-server process runs.",
                           labels=["server"])
    backlog = GaugeMetricFamily("zarkov_journal_backlog_files", "Journal files full and not "
                                "yet stored in the database.", labels=["server"])
    db_ok = GaugeMetricFamily("zarkov_event_database_ok", "1 while the last insert succeeded.",
                              labels=["server"])
    db_errors = CounterMetricFamily("zarkov_event_database_errors", "Inserts that failed "
                                    "because the database could not take them (retried).",
                                    labels=["server"])
    loop_errors = CounterMetricFamily("zarkov_event_loop_errors", "Unexpected exceptions "
                                      "of an event server's loops (each logged).",
                                      labels=["server"])
    commit = HistogramMetricFamily("zarkov_event_commit_seconds", "Seconds from an event "
                                   "batch's arrival in the journal to its acknowledged "
                                   "insert.", labels=["server"])
    for s in snapshots:
        index = s.get("index", 0)
        server = s.get("server") or ("proxy" if index == -1 else str(index))
        if server == "proxy":
            events.add_metric([server, "refused"], s.get("refused", 0))
            continue
        for outcome, field in EVENT_OUTCOMES:
            events.add_metric([server, outcome], s.get(field, 0))
        up.add_metric([server], 1 if s.get("alive", alive(s.get("pid"))) else 0)
        backlog.add_metric([server], s.get("backlog_files", 0))
        db_ok.add_metric([server], 1 if s.get("db_ok", True) else 0)
        db_errors.add_metric([server], s.get("db_errors", 0))
        loop_errors.add_metric([server], s.get("errors", 0))
        _histogram(commit, [server], s.get("commit_seconds"))
    return [events, up, backlog, db_ok, db_errors, loop_errors, commit]


def router_families(reply: Optional[dict[str, Any]]) -> list[Metric]:
    """The router's ``status`` reply (None or ``{"error": ...}``: it did not answer)."""
    up = GaugeMetricFamily("zarkov_router_up", "1 when the router answered its status "
                           "request.")
    ok = reply is not None and "error" not in reply
    up.add_metric([], 1 if ok else 0)
    if not ok:
        return [up]
    assert reply is not None
    workers = GaugeMetricFamily("zarkov_router_workers", "Worker processes connected.")
    workers.add_metric([], reply.get("workers", 0))
    jobs = GaugeMetricFamily("zarkov_router_jobs", "Jobs the router knows (running, and "
                             "finished in the last hour) by state.", labels=["state"])
    for state, n in sorted((reply.get("jobs_by_state") or {}).items()):
        jobs.add_metric([state], n)
    ended = CounterMetricFamily("zarkov_router_jobs_finished", "Jobs finished since the "
                                "router started, by final state.", labels=["state"])
    for state, n in sorted((reply.get("jobs_finished") or {}).items()):
        ended.add_metric([state], n)
    retries = CounterMetricFamily("zarkov_router_task_retries", "Tasks sent again: their "
                                  "worker was lost, or they passed zmr.max_chunk_timeout.",
                                  labels=["reason"])
    retries.add_metric(["worker_lost"], reply.get("tasks_resent_lost", 0))
    retries.add_metric(["time_limit"], reply.get("tasks_resent_for_time_limit", 0))
    waiting = GaugeMetricFamily("zarkov_router_tasks_waiting", "Tasks waiting for a "
                                "worker.")
    waiting.add_metric([], reply.get("tasks_waiting", 0))
    errors = CounterMetricFamily("zarkov_router_loop_errors", "Unexpected exceptions of the "
                                 "router's loops (each logged).")
    errors.add_metric([], reply.get("errors", 0))
    refused = CounterMetricFamily("zarkov_router_refused", "Connections refused for want of "
                                  "an authorised CURVE key.")
    refused.add_metric([], reply.get("refused", 0))
    return [up, workers, jobs, ended, retries, waiting, errors, refused]


def aggdef_families(aggdefs: Iterable[dict[str, Any]]) -> list[Metric]:
    """Per AggDef (``/aggdefs`` entries, with their ``runs`` counters): runs,
    their duration, events counted, and the lag."""
    runs = CounterMetricFamily("zarkov_aggdef_runs", "Aggregation runs by outcome.",
                               labels=["aggdef", "outcome"])
    seconds = HistogramMetricFamily("zarkov_aggdef_run_seconds", "Seconds of the "
                                    "aggregation runs that succeeded.", labels=["aggdef"])
    counted = CounterMetricFamily("zarkov_aggdef_events_counted", "Events the AggDef's "
                                  "incremental runs took.", labels=["aggdef"])
    waiting = GaugeMetricFamily("zarkov_aggdef_events_waiting", "Events stored and not yet "
                                "counted by the AggDef.", labels=["aggdef"])
    oldest = GaugeMetricFamily("zarkov_aggdef_oldest_waiting_seconds", "Age of the oldest "
                               "event waiting for the AggDef (0: none waits).",
                               labels=["aggdef"])
    running = GaugeMetricFamily("zarkov_aggdef_running", "1 while a run of the AggDef "
                                "holds its lease.", labels=["aggdef"])
    last_ok = GaugeMetricFamily("zarkov_aggdef_last_success_timestamp_seconds", "When "
                                "the last successful run ended (Unix time).",
                                labels=["aggdef"])
    for a in aggdefs:
        name = str(a.get("name"))
        r = a.get("runs") or {}
        runs.add_metric([name, "ok"], r.get("ok", 0))
        runs.add_metric([name, "failed"], r.get("failed", 0))
        _histogram(seconds, [name], r.get("seconds"))
        counted.add_metric([name], r.get("events", 0))
        lag = a.get("lag") or {}
        waiting.add_metric([name], lag.get("waiting") or 0)
        oldest.add_metric([name], lag.get("oldest_age") or 0)
        running.add_metric([name], 1 if a.get("running") else 0)
        ended = (a.get("last") or {}).get("ended")
        if ended is not None and hasattr(ended, "timestamp"):
            last_ok.add_metric([name], utc_seconds(ended))
    return [runs, seconds, counted, waiting, oldest, running, last_ok]


def worker_families(snapshots: Iterable[dict[str, Any]]) -> list[Metric]:
    """A worker pool's processes, from their stats snapshots (one per slot: a process
    that replaces a recycled one goes on from its counts)."""
    procs = GaugeMetricFamily("zarkov_worker_processes", "Worker processes running.")
    tasks = CounterMetricFamily("zarkov_worker_tasks", "Tasks run, by kind and outcome.",
                                labels=["kind", "outcome"])
    docs = CounterMetricFamily("zarkov_worker_documents_mapped", "Input documents the map "
                               "functions were called on.")
    recycled = CounterMetricFamily("zarkov_worker_recycles", "Worker processes that ended "
                                   "to be replaced (zmr.requests_per_worker_process, "
                                   "zmr.suicide_level).")
    totals: dict[tuple[str, str], int] = {}
    n_alive = n_docs = n_recycled = 0
    for s in snapshots:
        n_alive += 1 if alive(s.get("pid")) else 0
        n_docs += int(s.get("documents", 0))
        n_recycled += int(s.get("recycles", 0))
        for key, n in (s.get("tasks") or {}).items():
            kind, _, outcome = key.partition(":")
            totals[(kind, outcome)] = totals.get((kind, outcome), 0) + int(n)
    procs.add_metric([], n_alive)
    for (kind, outcome), n in sorted(totals.items()):
        tasks.add_metric([kind, outcome], n)
    docs.add_metric([], n_docs)
    recycled.add_metric([], n_recycled)
    return [procs, tasks, docs, recycled]
