#!/usr/bin/env python3
"""Benchmark the aggregation service: incremental cost, late events, full-run speed.

The article's task (count events per ``foo``, ``my.tasks.MyTask``) runs on a router
and a 2-process worker pool started here, through ``zarkov.aggregation.run`` — what
``zcmd aggregate`` calls, minus the command's ~1 s of start-up.

1. Incremental cost: a collection of ``--n`` events already aggregated (inserted
   flagged, with the matching output, which is the state a long history of runs
   leaves) receives ``--new`` events; the incremental run over them is timed.
   Against: the first run over a collection holding only ``--new`` events.
   Target ratio: <= 1.5.  Each is done ``--runs`` times; medians are compared.
2. Late events: ``--late`` events whose ObjectIds and timestamps predate the last
   run (a journal replayed after an outage, another program's batch load) are added
   and a run is done: they are counted, where a selection restricted to documents
   inserted since ``last_run`` would take none of them.  Both selections are timed.
3. Full run: events/s of a first ``full`` run over ``--full-n`` events (default
   ``--n``), against one process counting the same with pymongo and a dict.

Every output is checked against a Python count; each run's time is broken down by
phase (mark, jobs, merge, apply, flag; seconds) and each run says how it wrote its
target (``zarkov.storage``'s path).  All of it runs on each server (``--server``,
see bench/servers.py: both bundled servers by default), then the figures are
printed side by side, a column a server.  Usage::

    python bench/aggregate.py [--server both] [--n 1000000] [--new 10000] [--runs 3]
                              [--full-n N]

Databases of its own are created and dropped.  On the bundled FerretDB every filter
but ``_id`` equality scans its whole collection (see docs/exactly-once.md), so
marking and flagging cost grows with ``--n``: use e.g. ``--n 20000 --new 200``
there; a full 1,000,000-event run is out of reach on it.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "tests", "fixtures", "agg")
sys.path[:0] = [ROOT, TASKS]

import pymongo  # noqa: E402
import yaml  # noqa: E402
from bson import ObjectId  # noqa: E402

import servers  # noqa: E402  (bench/servers.py)
from zarkov import aggregation, wire  # noqa: E402
from zarkov import config as C  # noqa: E402
from tests.support import free_port  # noqa: E402

NAME = "bench_agg"
TARGET = "zagg.my_agg"
KEYS = [f"k{i}" for i in range(100)]


class Cluster:
    """A router and a worker pool (zcmd processes) on ports of their own."""

    def __init__(self, uri: str, tmp: str):
        port = free_port()
        self.data = {"mongo_uri": uri, "mongo_database": "unused",
                     "zmr": {"req_uri": f"tcp://127.0.0.1:{port}",
                             "req_bind": f"tcp://127.0.0.1:{port}",
                             "worker_uri": "tcp://127.0.0.1", "job_root": f"{tmp}/jobs",
                             "processes_per_worker": 2, "reduce_count": 16,
                             "event_limit": 10_000_000}}
        self.path = f"{tmp}/zarkov.yaml"
        with open(self.path, "w") as f:
            yaml.safe_dump(self.data, f)
        zcmd = [sys.executable, os.path.join(ROOT, "scripts", "zcmd"), "-y", self.path]
        self.logs = open(f"{tmp}/cluster.log", "ab")
        self.procs = [subprocess.Popen(zcmd + [cmd], stdout=self.logs, stderr=subprocess.STDOUT,
                                       start_new_session=True)
                      for cmd in ("zmr-router", "zmr-worker")]
        deadline = time.monotonic() + 30
        while True:
            try:
                wire.request(self.data["zmr"]["req_uri"], {"$command": "echo"}, timeout=1)
                break
            except wire.RouterTimeout:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the router did not start; see {tmp}/cluster.log")

    def config(self, database: str) -> C.Config:
        return C.from_dict({**self.data, "mongo_database": database})

    def stop(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)


def events(n: int, rnd: random.Random, **extra) -> list[dict]:
    return [{"type": "download", "foo": rnd.choice(KEYS), **extra} for _ in range(n)]


def insert(db, docs: list[dict], batch: int = 10000) -> None:
    for i in range(0, len(docs), batch):
        db.event.insert_many(docs[i:i + batch], ordered=False)


def register(db) -> None:
    db.agg_def.insert_one({"name": NAME, "task_name": "my.tasks.MyTask", "object": "event",
                           "last_run": datetime(1970, 1, 1), "realtime": False})


def python_count(db) -> dict:
    return dict(collections.Counter(d["foo"] for d in db.event.find({}, {"foo": 1})))


def check(db) -> None:
    got = {d["_id"]: d["value"] for d in db[TARGET].find()}
    if got != python_count(db):
        raise SystemExit(f"MISMATCH in {db.name}: output differs from a Python count")


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


class Phases:
    """A progress callback that adds up the time spent in each phase of a run."""

    GROUPS = {"jobs:": "jobs", "merging": "merge", "applying": "apply", "copying": "apply",
              "replaced": "apply", "marking": "mark", "flagging": "flag"}

    def __init__(self):
        self.spent: dict[str, float] = collections.defaultdict(float)
        self.current, self.since = None, time.perf_counter()

    def __call__(self, status: dict) -> None:
        group = self.GROUPS.get(status["phase"].split()[0], "other")
        now = time.perf_counter()
        if group != self.current:
            if self.current:
                self.spent[self.current] += now - self.since
            self.current, self.since = group, now

    def run(self, cfg, **kw):
        """aggregation.run with this callback; returns (seconds, result, breakdown)."""
        self.__init__()
        t, res = timed(lambda: aggregation.run(cfg, NAME, progress=self, **kw))
        self.spent[self.current or "other"] += time.perf_counter() - self.since
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.spent.items())
        paths = ", ".join(sorted(set(res.write_paths.values())))
        return t, res, f"{parts}; {paths}" if paths else parts


def fresh(client, label: str):
    db = client[f"zb_{label}_{uuid.uuid4().hex[:8]}"]
    register(db)
    return db


def incremental(client, cluster: Cluster, args, rnd, figures: dict) -> None:
    print(f"\n== incremental cost: {args.n} events aggregated + {args.new} new "
          f"(x{args.runs}), vs a first run over {args.new}")
    big = fresh(client, "big")
    t, _ = timed(lambda: insert(big, events(args.n, rnd, aggregates=[NAME], jobs=[])))
    print(f"setup: inserted {args.n} aggregated events in {t:.1f} s "
          f"({args.n / t:,.0f}/s)")
    counts = python_count(big)
    if counts:
        big[TARGET].insert_many([{"_id": k, "value": v} for k, v in counts.items()])
    cfg = cluster.config(big.name)
    inc = []
    try:
        for _ in range(args.runs):
            insert(big, events(args.new, rnd))
            t, res, parts = Phases().run(cfg)
            assert res.docs == args.new, res
            inc.append(t)
            print(f"  incremental run over {args.new} new among "
                  f"{big.event.estimated_document_count()}: {t:.2f} s ({parts})")
        check(big)
        late(big, cfg, args, rnd, figures)
    finally:
        client.drop_database(big.name)
    first = []
    for _ in range(args.runs):
        small = fresh(client, "small")
        try:
            insert(small, events(args.new, rnd))
            t, res, parts = Phases().run(cluster.config(small.name))
            check(small)
            first.append(t)
            print(f"  first run over a collection of {args.new}: {t:.2f} s ({parts})")
        finally:
            client.drop_database(small.name)
    ratio = statistics.median(inc) / statistics.median(first)
    figures[f"incremental run: {args.new} new among {args.n:,} aggregated"] = (
        f"{statistics.median(inc):.2f} s")
    figures[f"first run over {args.new}"] = f"{statistics.median(first):.2f} s"
    figures["ratio incremental / first (target <= 1.5)"] = f"{ratio:.2f}"
    print(f"incremental {statistics.median(inc):.2f} s / first run {statistics.median(first):.2f} s"
          f" = ratio {ratio:.2f} (target <= 1.5)")


def late(db, cfg, args, rnd, figures: dict) -> None:
    """Late events: older ids and timestamps than last_run; counted anyway."""
    last_run = db.agg_def.find_one({"name": NAME})["last_run"]
    old = last_run - timedelta(days=1)
    docs = events(args.late, rnd)
    stamp = ObjectId.from_datetime(old.replace(tzinfo=timezone.utc)).binary[:4]
    for d in docs:
        d["_id"] = ObjectId(stamp + os.urandom(8))  # as a client made it a day ago
        d["timestamp"] = old
    insert(db, docs)
    since = {"_id": {"$gte": ObjectId.from_datetime(last_run.replace(tzinfo=timezone.utc))},
             "aggregates": {"$ne": NAME}}
    t_since, n_since = timed(lambda: len(list(db.event.find(since, {"_id": 1}))))
    t_ours, n_ours = timed(lambda: len(list(db.event.find({"aggregates": {"$ne": NAME}},
                                                         {"_id": 1}))))
    res = aggregation.run(cfg, NAME)
    check(db)
    figures[f"late events counted (of {args.late})"] = f"{res.docs}"
    print(f"late events: {args.late} inserted with ids/timestamps a day before last_run;"
          f" the run took {res.docs} (output checked); a 'since last_run' selection would"
          f" take {n_since} ({t_since:.2f} s to select), ours takes {n_ours}"
          f" ({t_ours:.2f} s)")


def full(client, cluster: Cluster, args, rnd, figures: dict) -> None:
    n = args.full_n
    print(f"\n== first full run over {n} events (x{args.runs}) vs pymongo + dict")
    rates, base = [], []
    for _ in range(args.runs):
        db = fresh(client, "full")
        try:
            insert(db, events(n, rnd))
            t, res, parts = Phases().run(cluster.config(db.name), full=True)
            check(db)
            rates.append(n / t)
            tb, _ = timed(lambda: python_count(db))
            base.append(n / tb)
            print(f"  full run {t:.2f} s ({n / t:,.0f} events/s; {parts}); "
                  f"pymongo + dict {tb:.2f} s ({n / tb:,.0f} events/s)")
        finally:
            client.drop_database(db.name)
    figures[f"full run over {n}"] = f"{statistics.median(rates):,.0f} events/s"
    figures["pymongo + dict, same events"] = f"{statistics.median(base):,.0f} events/s"
    figures["ratio full run / pymongo + dict"] = (
        f"{statistics.median(rates) / statistics.median(base):.3g}")
    print(f"full run {statistics.median(rates):,.0f} events/s vs pymongo + dict "
          f"{statistics.median(base):,.0f} events/s: ratio "
          f"{statistics.median(rates) / statistics.median(base):.3g}")


def measure(server: servers.Server, args) -> dict[str, str]:
    """Every figure on one server."""
    servers.heading(server, f"{os.cpu_count()} cores; router + 2 worker processes")
    client = pymongo.MongoClient(server.uri)
    rnd = random.Random(42)
    figures: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(server.uri, tmp)
        try:
            if "incremental" not in args.skip:
                incremental(client, cluster, args, rnd, figures)
            if "full" not in args.skip:
                full(client, cluster, args, rnd, figures)
        finally:
            cluster.stop()
            client.close()
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    servers.add_argument(p)
    p.add_argument("--n", type=int, default=1_000_000, help="events already aggregated")
    p.add_argument("--new", type=int, default=10_000, help="new events per incremental run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--late", type=int, default=100, help="late events (part 2)")
    p.add_argument("--full-n", type=int, default=None, help="events of the full run "
                   "(default --n)")
    p.add_argument("--skip", choices=["incremental", "full"], action="append", default=[])
    args = p.parse_args()
    args.full_n = args.full_n or args.n
    chosen = servers.chosen(args)
    figures = {server.label: measure(server, args) for server in chosen}
    servers.side_by_side(f"bench/aggregate.py: the article's count per foo, medians of "
                         f"{args.runs} runs", chosen, figures)


if __name__ == "__main__":
    main()
