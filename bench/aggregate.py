#!/usr/bin/env python3
"""Benchmark the aggregation service: incremental cost, small runs, late events, full runs.

The article's task (count events per ``foo``, ``my.tasks.MyTask``) runs on a router
and a 2-process worker pool started here, through ``zarkov.aggregation.run`` — what
``zcmd aggregate`` calls, minus the command's ~1 s of start-up.

Events are stored as the event logger stores them (``--events logged``, the
default: each with its position, the stream's bound published; a history of runs
leaves the AggDef's position at the bound), or as another program writes them
(``--events other``: no position; counted by marks and flags).

1. Incremental cost: a collection of ``--n`` events already aggregated (with the
   matching output, which is the state a long history of runs leaves) receives
   ``--new`` events; the incremental run over them is timed.  Against: the first
   run over a collection holding only ``--new`` events.  Target ratio: <= 1.2.
   With logged events these runs take positions alone, as runs between two sweeps
   do (``sweep_interval``); part 2 gives what a sweep adds.
   Each is done ``--runs`` times; medians are compared.
2. Small runs: ``--small`` (10) new events, alone in a collection of their own and
   among the ``--n``: the wall time of a run, broken down by phase (setup — the
   AggDef, the lease, the pending run —, selecting and marking, the jobs, merging,
   applying, flagging, finishing), with and without the look for events without a
   position (``sweep``: a scan where no index serves it; the real-time loop does it
   at most every realtime_interval).  Target: <= 0.3 s (FerretDB, among 100,000),
   <= 0.05 s (java, among 1,000,000).
3. Late events: ``--late`` events whose ObjectIds and timestamps predate the last
   run (another program's batch load) are added and a run is done: they are
   counted, where a selection restricted to documents inserted since ``last_run``
   would take none of them.  Both selections are timed.
4. Full re-run over the collection of part 1, every event already aggregated:
   events/s against one process counting the same with pymongo and a dict (target
   >= 0.5x), and the events it wrote (none).
5. First full run: events/s of a ``full`` run over ``--full-n`` events (default
   ``--n``) never aggregated, against pymongo + dict.

Every output is checked against a Python count; each run's time is broken down by
phase (seconds) and each run says how it wrote its target (``zarkov.storage``'s
path; ``inline``-sized outputs are kept in the run record).  All of it runs on each
server (``--server``, see bench/servers.py: both bundled servers by default), then
the figures are printed side by side, a column a server.  Usage::

    python bench/aggregate.py [--server both] [--n 100000] [--new 1000] [--small 10]
                              [--runs 3] [--full-n N] [--skip first-full]
                              [--events logged|other]

Databases of its own are created and dropped.  On the bundled FerretDB every filter
but ``_id`` equality scans its whole collection (see docs/exactly-once.md): events
with a position are read by ``_id``, one query each; the marks of events without
one cost a scan.
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

import pymongo
import servers
import yaml
from bson import ObjectId
from pymongo import monitoring

from tests.support import free_port
from zarkov import aggregation, positions, streams, wire
from zarkov import config as C
from zarkov.eventlog.stream import Stream

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
                    raise SystemExit(f"the router did not start; see {tmp}/cluster.log") \
                        from None

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


#: --events: how events are stored (set by main).
KIND = "logged"
#: Whether incremental runs sweep (set by main): not with logged events, as runs
#: between two sweeps (sweep_interval) do; with the others, they must (every run).
SWEEP = False
_streams: dict[str, Stream] = {}


def insert(db, docs: list[dict], batch: int = 10000, kind: str | None = None) -> None:
    """Store ``docs`` as the event logger does (``logged``: positions, the stream's
    bound published after each insert) or as another program does (``other``)."""
    logged = (kind or KIND) == "logged"
    stream = _streams.setdefault(db.name, Stream.detached())
    for i in range(0, len(docs), batch):
        part = docs[i:i + batch]
        if logged:
            part = [{"_id": positions.oid(stream.stream, stream.take()[1]),
                     positions.SEQ_FIELD: positions.seq_value(stream.seq), **d} for d in part]
        db.event.insert_many(part, ordered=False)
        if logged:
            streams.publish(db, "event", {stream.stream: stream.seq}, "bench")


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
              "replaced": "apply", "marking": "mark", "flagging": "flag",
              "finishing": "finish", "selecting": "select"}
    ORDER = ("setup", "select", "mark", "jobs", "merge", "apply", "flag", "finish", "other")

    def __init__(self):
        self.spent: dict[str, float] = collections.defaultdict(float)
        self.current, self.since = "setup", time.perf_counter()

    def __call__(self, status: dict) -> None:
        group = self.GROUPS.get(status["phase"].split()[0], "other")
        now = time.perf_counter()
        if group != self.current:
            self.spent[self.current] += now - self.since
            self.current, self.since = group, now

    def run(self, cfg, **kw):
        """aggregation.run with this callback; returns (seconds, result, breakdown)."""
        self.__init__()
        t, res = timed(lambda: aggregation.run(cfg, NAME, progress=self, **kw))
        self.spent[self.current] += time.perf_counter() - self.since
        return t, res, self.describe(res)

    def describe(self, res=None) -> str:
        parts = ", ".join(f"{k} {self.spent[k]:.3f}" for k in self.ORDER if k in self.spent)
        paths = ", ".join(sorted(set(res.write_paths.values()))) if res else ""
        return f"{parts}; {paths}" if paths else parts


def fresh(client, label: str):
    db = client[f"zb_{label}_{uuid.uuid4().hex[:8]}"]
    register(db)
    return db


def median_phases(all_phases: list[dict]) -> str:
    """The median seconds of each phase over several runs."""
    keys = [k for k in Phases.ORDER if any(k in p for p in all_phases)]
    return ", ".join(f"{k} {statistics.median(p.get(k, 0.0) for p in all_phases):.3f}"
                     for k in keys)


def aggregated(client, n: int, rnd, label: str):
    """A fresh collection of ``n`` events already aggregated, with the output."""
    db = fresh(client, label)
    if KIND == "logged":  # the AggDef's position at the streams' bounds
        t, _ = timed(lambda: insert(db, events(n, rnd)))
        bounds = streams.bounds(db, "event")
        db.agg_position.insert_one({"_id": NAME, "streams": bounds})
    else:
        t, _ = timed(lambda: insert(db, events(n, rnd, aggregates=[NAME], jobs=[])))
    print(f"setup: inserted {n} aggregated events in {t:.1f} s ({n / t:,.0f}/s)")
    counts = python_count(db)
    if counts:
        db[TARGET].insert_many([{"_id": k, "value": v} for k, v in counts.items()])
    return db


def incremental(client, cluster: Cluster, args, rnd, figures: dict) -> None:
    print(f"\n== incremental cost: {args.n} events aggregated + {args.new} new "
          f"(x{args.runs}), vs a first run over {args.new}")
    big = aggregated(client, args.n, rnd, "big")
    cfg = cluster.config(big.name)
    inc = []
    try:
        for _ in range(args.runs):
            insert(big, events(args.new, rnd))
            t, res, parts = Phases().run(cfg, sweep=SWEEP)
            assert res.docs == args.new, res
            inc.append(t)
            print(f"  incremental run over {args.new} new among "
                  f"{big.event.estimated_document_count()}: {t:.2f} s ({parts})")
        check(big)
        if "small" not in args.skip:
            small_runs(big, cfg, args, rnd, figures, f"among {args.n:,}")
        late(big, cfg, args, rnd, figures)
        if "full" not in args.skip:
            rerun(big, cfg, args, figures)
    finally:
        client.drop_database(big.name)
    first = []
    for _ in range(args.runs):
        small = fresh(client, "small")
        try:
            insert(small, events(args.new, rnd))
            t, res, parts = Phases().run(cluster.config(small.name), sweep=SWEEP)
            check(small)
            first.append(t)
            print(f"  first run over a collection of {args.new}: {t:.2f} s ({parts})")
        finally:
            client.drop_database(small.name)
    ratio = statistics.median(inc) / statistics.median(first)
    figures[f"incremental run: {args.new} new among {args.n:,} aggregated"] = (
        f"{statistics.median(inc):.2f} s")
    figures[f"first run over {args.new}"] = f"{statistics.median(first):.2f} s"
    figures["ratio incremental / first (target <= 1.2)"] = f"{ratio:.2f}"
    print(f"incremental {statistics.median(inc):.2f} s / first run {statistics.median(first):.2f} s"
          f" = ratio {ratio:.2f} (target <= 1.2)")


def small_runs(db, cfg, args, rnd, figures: dict, where: str) -> None:
    """Runs over ``--small`` new events: wall time and its phases (medians), taking
    positions alone and looking for events without a position too."""
    # Events of another program have no position: only a run that sweeps counts them.
    for sweep in (False, True) if KIND == "logged" else (True,):
        times, phases = [], []
        for _ in range(max(args.runs, 5)):
            insert(db, events(args.small, rnd))
            p = Phases()
            t, res, parts = p.run(cfg, sweep=sweep)
            assert res.docs == args.small, res
            times.append(t)
            phases.append(dict(p.spent))
        check(db)
        how = "with the look for events without a position" if sweep else "positions alone"
        print(f"  runs over {args.small} new events {where}, {how}: median "
              f"{statistics.median(times):.3f} s ({median_phases(phases)})")
        figures[f"run over {args.small} new events {where}, {how}"] = (
            f"{statistics.median(times):.3f} s")
        figures[f"  its phases, {how} (s)"] = median_phases(phases)


def small_alone(client, cluster: Cluster, args, rnd, figures: dict) -> None:
    print(f"\n== small runs: {args.small} new events in a collection of their own")
    db = aggregated(client, 1000, rnd, "tiny")
    try:
        aggregation.run(cluster.config(db.name), NAME)  # a first run: the process warm
        small_runs(db, cluster.config(db.name), args, rnd, figures, "alone")
    finally:
        client.drop_database(db.name)


def late(db, cfg, args, rnd, figures: dict) -> None:
    """Late events: older ids and timestamps than last_run; counted anyway."""
    last_run = db.agg_def.find_one({"name": NAME})["last_run"]
    old = last_run - timedelta(days=1)
    docs = events(args.late, rnd)
    stamp = ObjectId.from_datetime(old.replace(tzinfo=timezone.utc)).binary[:4]
    for d in docs:
        d["_id"] = ObjectId(stamp + os.urandom(8))  # as a client made it a day ago
        d["timestamp"] = old
    insert(db, docs, kind="other")
    since = {"_id": {"$gte": ObjectId.from_datetime(last_run.replace(tzinfo=timezone.utc))},
             "aggregates": {"$ne": NAME}}
    t_since, n_since = timed(lambda: len(list(db.event.find(since, {"_id": 1}))))
    t_ours, n_ours = timed(lambda: len(list(db.event.find({"aggregates": {"$ne": NAME}},
                                                         {"_id": 1}))))
    res = aggregation.run(cfg, NAME, sweep=True)  # events of another program: a sweep
    check(db)
    figures[f"late events counted (of {args.late})"] = f"{res.docs}"
    print(f"late events: {args.late} inserted with ids/timestamps a day before last_run;"
          f" the run took {res.docs} (output checked); a 'since last_run' selection would"
          f" take {n_since} ({t_since:.2f} s to select), ours takes {n_ours}"
          f" ({t_ours:.2f} s)")


class EventWrites(monitoring.CommandListener):
    """Documents of ``event`` that update commands of one database modified."""

    def __init__(self):
        self.database, self.modified, self._ours = None, 0, set()

    def started(self, event):
        if event.database_name == self.database and event.command_name == "update" \
                and event.command.get("update") == "event":
            self._ours.add(event.request_id)

    def succeeded(self, event):
        if event.request_id in self._ours:
            self._ours.discard(event.request_id)
            self.modified += int(event.reply.get("nModified", 0))

    def failed(self, event):
        self._ours.discard(event.request_id)


WRITES = EventWrites()
monitoring.register(WRITES)  # before any client is made


def full_against_count(db, cfg, n: int, what: str, rates: list, base: list) -> None:
    """One full run over the ``n`` events of ``db``, then the pymongo + dict count of
    them: events/s of each appended to ``rates`` and ``base``."""
    t, res, parts = Phases().run(cfg, full=True)
    assert res.docs == n, res
    check(db)
    rates.append(n / t)
    tb, _ = timed(lambda: python_count(db))
    base.append(n / tb)
    print(f"  {what} {t:.2f} s ({n / t:,.0f} events/s; {parts}); "
          f"pymongo + dict {tb:.2f} s ({n / tb:,.0f} events/s)")


def rerun(db, cfg, args, figures: dict) -> None:
    """A full run over a collection whose every event is already aggregated."""
    n = db.event.estimated_document_count()
    print(f"\n== full re-run over {n} events already aggregated (x{args.runs}) "
          f"vs pymongo + dict")
    rates, base = [], []
    WRITES.database, WRITES.modified = db.name, 0
    for _ in range(args.runs):
        full_against_count(db, cfg, n, "full re-run", rates, base)
    written, WRITES.database = WRITES.modified, None
    ratio = statistics.median(rates) / statistics.median(base)
    figures[f"full re-run over {n:,} aggregated"] = (
        f"{statistics.median(rates):,.0f} events/s")
    figures["pymongo + dict, same events"] = f"{statistics.median(base):,.0f} events/s"
    figures["ratio full re-run / pymongo + dict (target >= 0.5)"] = f"{ratio:.2f}"
    figures["events written by the full re-runs"] = f"{written}"
    print(f"full re-run {statistics.median(rates):,.0f} events/s vs pymongo + dict "
          f"{statistics.median(base):,.0f} events/s: ratio {ratio:.2f} (target >= 0.5); "
          f"events written: {written}")


def full(client, cluster: Cluster, args, rnd, figures: dict) -> None:
    n = args.full_n
    print(f"\n== first full run over {n} events (x{args.runs}) vs pymongo + dict")
    rates, base = [], []
    for _ in range(args.runs):
        db = fresh(client, "full")
        try:
            insert(db, events(n, rnd))
            full_against_count(db, cluster.config(db.name), n, "full run", rates, base)
        finally:
            client.drop_database(db.name)
    figures[f"first full run over {n:,}"] = f"{statistics.median(rates):,.0f} events/s"
    figures["ratio first full run / pymongo + dict"] = (
        f"{statistics.median(rates) / statistics.median(base):.2f}")
    print(f"first full run {statistics.median(rates):,.0f} events/s vs pymongo + dict "
          f"{statistics.median(base):,.0f} events/s: ratio "
          f"{statistics.median(rates) / statistics.median(base):.2f}")


def measure(server: servers.Server, args) -> dict[str, str]:
    """Every figure on one server."""
    servers.heading(server, f"{os.cpu_count()} cores; router + 2 worker processes")
    client = pymongo.MongoClient(server.uri)
    rnd = random.Random(42)
    figures: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(server.uri, tmp)
        try:
            if "small" not in args.skip:
                small_alone(client, cluster, args, rnd, figures)
            if "incremental" not in args.skip:
                incremental(client, cluster, args, rnd, figures)
            if "first-full" not in args.skip:
                full(client, cluster, args, rnd, figures)
        finally:
            cluster.stop()
            client.close()
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    servers.add_argument(p)
    p.add_argument("--n", type=int, default=100_000, help="events already aggregated")
    p.add_argument("--new", type=int, default=1_000, help="new events per incremental run")
    p.add_argument("--small", type=int, default=10, help="new events of a small run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--late", type=int, default=100, help="late events (part 3)")
    p.add_argument("--full-n", type=int, default=None, help="events of the first full run "
                   "(default --n)")
    p.add_argument("--events", choices=["logged", "other"], default="logged",
                   help="events stored by the event logger (positions) or by another "
                        "program (marks)")
    p.add_argument("--skip", choices=["incremental", "small", "full", "first-full"],
                   action="append", default=[],
                   help="leave a part out (full: the re-run; incremental: it and the "
                        "re-run and late events)")
    args = p.parse_args()
    args.full_n = args.full_n or args.n
    global KIND, SWEEP
    KIND = args.events
    SWEEP = KIND == "other"
    chosen = servers.chosen(args)
    figures = {server.label: measure(server, args) for server in chosen}
    servers.side_by_side(f"bench/aggregate.py: the article's count per foo, {args.events} "
                         f"events, medians of {args.runs} runs", chosen, figures)


if __name__ == "__main__":
    main()
