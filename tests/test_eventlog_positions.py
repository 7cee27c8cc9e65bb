"""Positions through the real event logger: SIGKILLed between journal and insert, or
between insert and bound; several event servers; clean restarts; every event counted
once by ``zcmd aggregate`` (on the module's shared cluster)."""
from __future__ import annotations

import os
import signal

import pytest

from tests import aggtools as A
from tests.eventlog_util import load, push, start_logger, stats
from tests.support import wait_for
from zarkov import faults, streams


def events(first: int, n: int, keys: str = "abcde") -> list[dict]:
    """``n`` events numbered from ``first``; ``foo`` one of ``keys`` (what MyTask counts)."""
    return [{"type": "t", "foo": keys[i % len(keys)], "extra": {"seq": i}}
            for i in range(first, first + n)]


def _noval(evs: list[dict]) -> list[dict]:
    # MyTask counts the top-level `foo`, which only event_noval events may carry.
    return [{"$command": "event_noval", **e} for e in evs]


def marked() -> dict:
    """An event whose batch makes an armed fault point fire."""
    return {"$command": "event_noval", "type": "t", "foo": "z", "extra": {
        "mark": faults.MARK.decode()}}


@pytest.fixture
def config(shared_config_file, db, tmp_path):
    """The test's config on the module's cluster, with a journal of its own."""
    A.register(db)
    return shared_config_file(journal=str(tmp_path / "journal"))


@pytest.mark.parametrize("point", ["commit.insert", "commit.publish"])
def test_logger_killed_between_journal_and_bound_then_restarted(procs, config, db, point):
    """Killed before an insert (the events only journaled) or after it (stored, the
    bound not moved): a run takes only what the bound covers; the restarted logger
    stores the rest once, under the old stream's positions, and moves its bound."""
    cfg = load(config)
    p = start_logger(procs, config, env={"ZARKOV_FAULTS": f"{point}:pause"})
    push(cfg["bson_bind_address"], _noval(events(0, 100)))
    wait_for(lambda: sum(streams.bounds(db, "event").values()) == 100, what="bound 100")
    push(cfg["bson_bind_address"], [marked()] + _noval(events(100, 50)))
    wait_for(lambda: f"zarkov-fault-pause {point}" in procs.log("eventlog"), what="the pause")
    push(cfg["bson_bind_address"], _noval(events(150, 30)))  # journaled meanwhile
    wait_for(lambda: stats(cfg["journal"]).get("accepted") == 181, what="181 accepted")
    procs.kill(p)
    (old, bound), = streams.bounds(db, "event").items()
    assert bound == 100
    stored = db.event.count_documents({})
    assert stored == 100 if point == "commit.insert" else stored > 100

    A.ok(A.aggregate(config, A.NAME))  # up to the bound, whatever is stored
    assert sum(A.output(db).values()) == 100

    p2 = start_logger(procs, config, "eventlog2")
    push(cfg["bson_bind_address"], _noval(events(180, 20)))
    wait_for(lambda: db.event.count_documents({}) == 201, what="every event stored once")
    b = streams.bounds(db, "event")
    assert b[old] == 181 and len(b) == 2  # the old stream's bound moved; a new stream
    A.ok(A.aggregate(config, A.NAME))
    assert A.output(db) == A.python_count(db) and sum(A.output(db).values()) == 201
    A.assert_clean(db)
    procs.kill(p2, signal.SIGTERM)


def test_two_event_servers_interleaving_and_a_clean_restart(procs, shared_config_file, db,
                                                            tmp_path):
    A.register(db)
    config = shared_config_file(num_event_servers=2, journal=str(tmp_path / "journal"))
    cfg = load(config)
    p = procs.zcmd("eventlog", config, "eventlog")
    wait_for(lambda: stats(cfg["journal"], 0).get("pid") and stats(cfg["journal"], 1).get("pid"),
             timeout=30, what="two event servers")
    push(cfg["bson_bind_address"], _noval(events(0, 3000)))
    wait_for(lambda: sum(streams.bounds(db, "event").values()) == 3000, timeout=60,
             what="3000 events stored")
    two = streams.bounds(db, "event")
    assert len(two) == 2  # one stream per event server, each got a share
    A.ok(A.aggregate(config, A.NAME))
    assert A.output(db) == A.python_count(db)

    procs.kill(p, signal.SIGTERM)  # a clean stop: the streams go on after the restart
    assert p.returncode == 0, procs.log("eventlog")
    for i in (0, 1):
        assert os.path.exists(os.path.join(cfg["journal"], f"server-{i}", "stream.json"))
    p = procs.zcmd("eventlog2", config, "eventlog")
    wait_for(lambda: stats(cfg["journal"], 0).get("pid") and stats(cfg["journal"], 1).get("pid"),
             timeout=30, what="two event servers again")
    push(cfg["bson_bind_address"], _noval(events(3000, 1000)))
    wait_for(lambda: sum(streams.bounds(db, "event").values()) == 4000, timeout=60,
             what="4000 events stored")
    assert set(streams.bounds(db, "event")) == set(two)
    A.ok(A.aggregate(config, A.NAME))
    assert A.output(db) == A.python_count(db) and sum(A.output(db).values()) == 4000
    A.assert_clean(db)
    procs.kill(p, signal.SIGTERM)


def test_a_second_logger_on_the_same_journal_is_refused(procs, config):
    start_logger(procs, config)
    p = procs.zcmd("second", config, "eventlog")  # refused before it binds anything
    assert p.wait(30) == 1
    assert "is in use by another process" in procs.log("second")
