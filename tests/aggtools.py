"""Helpers of the aggregation tests: events, AggDefs, expected counts, zcmd aggregate."""
from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
from datetime import datetime

import yaml
from bson.int64 import Int64

from tests.support import ROOT, Processes, run_zcmd, wait_for, wait_router_idle
from zarkov import positions, streams
from zarkov.eventlog.stream import Stream

#: Where the article's `my.tasks` (and tests' failing tasks) live: put on PYTHONPATH.
TASKS_DIR = os.path.join(ROOT, "tests", "fixtures", "agg")
ENV = {"PYTHONPATH": ROOT + os.pathsep + TASKS_DIR}
TARGET = "zagg.my_agg"
NAME = "my_agg_def"


#: The kinds of events tests are run with: stored by the event logger (with a
#: position) or written by another program (counted by marks).
KINDS = ("logged", "other")

#: A stream per test database, for events stored "as the event logger does".
_streams: dict[str, Stream] = {}


def logger_stream(db) -> Stream:
    """The stream that :func:`add_events` gives ``logged`` events in ``db``."""
    return _streams.setdefault(db.name, Stream.detached())


def add_events(db, n: int, keys: str = "abcdefg", seed: int | None = None,
               kind: str = "other", coll: str = "event", **extra) -> None:
    """Insert ``n`` events ``{foo: <one of keys>}`` (plus ``extra`` fields).

    ``kind`` ``logged``: stored as the event logger stores them — each with the next
    position of the database's test stream, then that stream's bound published —
    without running one (process-level tests run the real thing).
    """
    rnd = random.Random(seed)
    docs = [{"foo": rnd.choice(keys), "type": "test", **extra} for _ in range(n)]
    if kind == "other":
        db[coll].insert_many(docs)
        return
    stream = logger_stream(db)
    positioned = []
    for d in docs:
        oid, seq = stream.take()
        positioned.append({"_id": positions.oid(stream.stream, seq), positions.SEQ_FIELD:
                           Int64(seq), **d})
    db[coll].insert_many(positioned)
    streams.publish(db, coll, {stream.stream: stream.seq}, "tests")


def count_all_logged(db, name: str = NAME) -> None:
    """Record that AggDef ``name`` has counted every logged event (what its runs leave)."""
    bounds = streams.bounds(db, "event")
    if bounds:
        db.agg_position.update_one({"_id": name}, {"$set": {f"streams.{s}": b
                                                             for s, b in bounds.items()}},
                                   upsert=True)


def register(db, name: str = NAME, task_name: str = "my.tasks.MyTask",
             object: str = "event") -> None:
    """Register an AggDef directly (the article's way is tested on its own)."""
    db.agg_def.insert_one({"name": name, "task_name": task_name, "object": object,
                           "last_run": datetime(1970, 1, 1), "realtime": False})


def python_count(db, coll: str = "event") -> dict:
    """What the article's MyTask must produce: events per value of ``foo``."""
    return dict(collections.Counter(d["foo"] for d in db[coll].find({}, {"foo": 1})))


def output(db, name: str = TARGET) -> dict:
    """The output collection as {_id: value}."""
    return {d["_id"]: d["value"] for d in db[name].find()}


def prepared(db, task_name: str = "my.tasks.MyTask", kind: str = "other") -> None:
    """Events already aggregated, then new ones: the next run has old values to merge.

    The aggregated state is written directly (what earlier runs leave), which keeps
    kill tests short; test_article_example checks that runs produce it.  ``kind``:
    the events are ``logged`` (positions) or ``other`` (marks).
    """
    register(db, task_name=task_name)
    if kind == "other":
        add_events(db, 200, seed=4, aggregates=[NAME], jobs=[])
    else:
        add_events(db, 200, seed=4, kind=kind)
        count_all_logged(db)
    db[TARGET].insert_many([{"_id": k, "value": v} for k, v in python_count(db).items()])
    # Many keys, so that applying takes several batches and can be cut in the middle.
    add_events(db, 180, keys=[f"k{i}" for i in range(120)] + list("abc"), seed=5, kind=kind)


def counted_positions(db, name: str = NAME) -> dict:
    """``{stream: seq}``: how far AggDef ``name`` has counted each stream."""
    return (db.agg_position.find_one({"_id": name}) or {}).get("streams") or {}


def assert_clean(db, name: str = NAME, coll: str = "event", all_flagged: bool = True) -> None:
    """No run left over: no run record, no lease, no staging, no marks; nothing
    written to events with a position.  ``all_flagged``: every event counted (those
    without a position flagged, the streams counted up to their bounds)."""
    assert db.agg_run.count_documents({}) == 0, list(db.agg_run.find())
    assert db.agg_lease.count_documents({}) == 0, list(db.agg_lease.find())
    assert [c for c in db.list_collection_names() if c.startswith("zstage.")] == []
    docs = list(db[coll].find({}, {"jobs": 1, "aggregates": 1, positions.SEQ_FIELD: 1}))
    assert all(not d.get("jobs") for d in docs), "events still marked with a run id"
    logged = [d for d in docs if positions.SEQ_FIELD in d]
    assert all("aggregates" not in d and "jobs" not in d for d in logged), \
        "a run wrote to events that have a position"
    if all_flagged:
        assert all(name in (d.get("aggregates") or []) for d in docs
                   if positions.SEQ_FIELD not in d), "events not flagged"
        done = counted_positions(db, name)
        assert all(done.get(s, 0) >= b for s, b in streams.bounds(db, coll).items()), \
            f"streams not counted to their bounds: {done} < {streams.bounds(db, coll)}"


def aggregate(config: str, *args: str, env: dict | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``zcmd aggregate`` to completion with the test task modules importable."""
    return run_zcmd(config, "aggregate", *args, env={**ENV, **(env or {})}, timeout=timeout)


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Assert a zcmd run succeeded (showing its output when not)."""
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def start_paused(procs: Processes, config: str, point: str, *args: str,
                 name: str = "agg") -> subprocess.Popen:
    """Start ``zcmd aggregate`` that pauses at ``point``; return once it is there."""
    p = procs.zcmd(name, config, "aggregate", NAME, *args,
                   env={**ENV, "ZARKOV_TEST_PAUSE_AT": point})
    wait_for(lambda: f"zarkov-test-pause {point}" in procs.log(name) or p.poll() is not None,
             timeout=120, what=f"zcmd aggregate to pause at {point}")
    assert p.poll() is None, f"exited before pausing at {point}:\n{procs.log(name)}"
    return p


def kill(procs: Processes, p: subprocess.Popen, config: str) -> None:
    """SIGKILL a ``zcmd aggregate`` (and its process group), then wait until the router
    runs none of its jobs (on the Dask engine, nothing to wait for).

    A run killed while its jobs run leaves them in the router: waiting for them keeps
    them from writing (into collections nobody reads) while the test goes on.
    """
    procs.kill(p, signal.SIGKILL)
    with open(config) as f:
        zmr = yaml.safe_load(f)["zmr"]
    # The Dask engine: its jobs' writes are its gateway's, killed with its group.
    if zmr.get("engine", "router") == "router":
        wait_router_idle(zmr["req_uri"])


def kill_at(procs: Processes, config: str, point: str, *args: str) -> None:
    """Run ``zcmd aggregate`` up to ``point`` and SIGKILL it there (see ``kill``)."""
    kill(procs, start_paused(procs, config, point, *args, name=f"agg-{point}"), config)


def running(db) -> bool:
    """Whether a run of the database's AggDef has started its jobs (state ``running``)."""
    run = db.agg_run.find_one({})
    return run is not None and run["state"] == "running" and run["attempt"] >= 1
