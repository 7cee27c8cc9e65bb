"""Runs by position: what the event logger stored is counted once, nothing written to
the events; streams whose bound lags; events without a position beside them; the
rotated collections.  Runs go through ``zarkov.aggregation.run`` (what ``zcmd
aggregate`` calls) on the module's shared cluster; the events are stored as the
event logger stores them (tests/aggtools.py), the logger itself is tested in
test_eventlog_positions.py.
"""
from __future__ import annotations

import threading

import pytest

from tests import aggtools as A
from tests.test_agg_engine import EventWrites
from zarkov import aggregation, positions, streams
from zarkov import config as C
from zarkov.eventlog.rotate import rotate


@pytest.fixture
def cfg(shared_config_file, monkeypatch):
    """This test's config (on the module's cluster), the task modules importable."""
    monkeypatch.syspath_prepend(A.TASKS_DIR)
    return C.load(shared_config_file())


@pytest.fixture
def event_writes(db):
    from pymongo import monitoring
    listener = EventWrites(db.name)
    monitoring.register(listener)
    return listener


def test_counting_logged_events_writes_nothing_to_them(db, cfg, event_writes):
    A.register(db)
    A.add_events(db, 300, seed=1, kind="logged")
    before = list(db.event.find())
    res = aggregation.run(cfg, A.NAME)
    assert res.docs == 300
    assert A.output(db) == A.python_count(db)
    A.add_events(db, 40, keys="az", seed=2, kind="logged")
    assert aggregation.run(cfg, A.NAME).docs == 40
    assert aggregation.run(cfg, A.NAME, full=True).docs == 340
    assert A.output(db) == A.python_count(db)
    # Not one event written (a full run's look for events without a position to mark
    # is an update that matches none).
    assert (event_writes.matched, event_writes.modified) == (0, 0)
    assert list(db.event.find({"_seq": {"$lte": 300}})) == before
    assert A.counted_positions(db) == {positions.key(A.logger_stream(db).stream): 340}
    A.assert_clean(db)


def test_logged_events_and_events_other_programs_write_are_each_counted_once(db, cfg):
    A.register(db)
    for i in range(3):
        A.add_events(db, 50, seed=10 + i, kind="logged")
        A.add_events(db, 30, keys="xyz", seed=20 + i)
        res = aggregation.run(cfg, A.NAME)
        assert res.docs == 80
        assert A.output(db) == A.python_count(db)
    assert aggregation.run(cfg, A.NAME).docs == 0
    assert aggregation.run(cfg, A.NAME, full=True).docs == 240
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


def test_a_run_takes_a_stream_up_to_its_bound_and_no_further(db, cfg):
    """Stored but not yet published (the committer between its insert and its bound):
    not taken; taken once the bound moves.  Other streams are not held back."""
    A.register(db)
    A.add_events(db, 100, keys="ab", seed=3, kind="logged")
    late = positions.new_stream()
    db.event.insert_many([{"_id": positions.oid(late, n), "_seq": positions.seq_value(n),
                           "foo": "late", "type": "test"} for n in range(1, 31)])
    streams.publish(db, "event", {late: 10}, "elsewhere")
    assert aggregation.run(cfg, A.NAME).docs == 110
    assert A.output(db)["late"] == 10
    A.add_events(db, 20, keys="ab", seed=4, kind="logged")  # the lagging one holds no one back
    assert aggregation.run(cfg, A.NAME).docs == 20
    streams.publish(db, "event", {late: 30}, "elsewhere")
    assert aggregation.run(cfg, A.NAME).docs == 20
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


def test_event_limit_cuts_a_range_and_the_run_goes_on(db, shared_config_file, monkeypatch):
    monkeypatch.syspath_prepend(A.TASKS_DIR)
    cfg = C.load(shared_config_file(zmr={"event_limit": 70}))
    A.register(db)
    A.add_events(db, 150, seed=5, kind="logged")
    A.add_events(db, 30, seed=6)
    res = aggregation.run(cfg, A.NAME)
    assert res.docs == 180
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


@pytest.mark.parametrize("kind", A.KINDS)
def test_rotate_between_two_runs_loses_nothing(db, cfg, tmp_path, kind):
    """The issue's case: counted, more stored, `zcmd rotate`, more, `zcmd aggregate`."""
    A.register(db)
    A.add_events(db, 2000, seed=7, kind=kind)
    assert aggregation.run(cfg, A.NAME).docs == 2000
    A.add_events(db, 500, seed=8, kind=kind)
    rotate(db, str(tmp_path / "dump"), cfg.num_event_logs, cfg.agg_lease_seconds)
    A.add_events(db, 300, seed=9, kind=kind)
    assert aggregation.run(cfg, A.NAME).docs == 800
    counts = A.python_count(db)
    for c, n in A.python_count(db, "event.0").items():
        counts[c] = counts.get(c, 0) + n
    assert sum(counts.values()) == 2800
    assert A.output(db) == counts
    assert aggregation.run(cfg, A.NAME, full=True).docs == 2800
    assert A.output(db) == counts
    A.assert_clean(db)
    A.assert_clean(db, coll="event.0")


def test_rotate_during_a_run_waits_for_it(db, shared_config_file, procs, tmp_path):
    config = shared_config_file()
    cfg = C.load(config)
    A.register(db, task_name="my.slow.SlowTask")
    A.add_events(db, 150, keys="ab", seed=11, kind="logged")  # its job maps for 3 s
    p = procs.zcmd("agg", config, "aggregate", A.NAME, env=A.ENV)
    A.wait_for(lambda: A.running(db), what="the run's job")
    done = []
    rotator = threading.Thread(target=lambda: done.append(
        rotate(db, str(tmp_path / "dump"), cfg.num_event_logs, cfg.agg_lease_seconds)))
    rotator.start()
    A.add_events(db, 40, keys="bc", seed=12, kind="logged")
    assert A.running(db), "the run ended before the test could act"
    assert p.wait(60) == 0, procs.log("agg")
    rotator.join(60)
    assert done and any("event.0" in line for line in done[0])
    A.add_events(db, 10, keys="c", seed=13, kind="logged")
    A.ok(A.aggregate(config, A.NAME))
    counts = A.python_count(db)
    for c, n in A.python_count(db, "event.0").items():
        counts[c] = counts.get(c, 0) + n
    assert A.output(db) == counts and sum(counts.values()) == 200
    A.assert_clean(db)


def test_sweeps_come_every_sweep_interval_where_they_read_everything(
        db, shared_config_file, procs, server):
    """With sweep_interval 60, runs between two sweeps take the logger's positions
    alone on a server without an index for the sweep (on MongoDB every run sweeps);
    `zcmd aggregate --sweep` sweeps at once."""
    config = shared_config_file(sweep_interval=60)
    A.register(db)
    A.add_events(db, 20, seed=14, kind="logged")
    A.add_events(db, 10, keys="xy", seed=15)
    res = A.ok(A.aggregate(config, A.NAME))  # never swept: it does
    assert "30 documents" in res.stdout and A.output(db) == A.python_count(db)
    A.add_events(db, 5, seed=16, kind="logged")
    A.add_events(db, 7, keys="xy", seed=17)
    res = A.ok(A.aggregate(config, A.NAME))
    indexed = server.caps.indexed_filters
    assert f"{12 if indexed else 5} documents" in res.stdout
    res = A.ok(A.aggregate(config, A.NAME, "--sweep"))
    assert f"{0 if indexed else 7} documents" in res.stdout
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)
