"""The aggregation service through real ``zcmd aggregate`` processes, exactly once.

Every run goes through the real map-reduce cluster: one ``zcmd zmr-router`` and
``zcmd zmr-worker`` (2 processes) shared by the tests of this module, each test with
its own database; then all again on the Dask engine (a Dask scheduler and 2 worker
processes; each ``zcmd aggregate`` with ``zmr.engine: dask`` starts its gateway).
Kill points are made deterministic by ZARKOV_TEST_PAUSE_AT (see
zarkov.aggregation); where a test must act while jobs run, the task's map is slow
(tests/fixtures/agg/my/slow.py).  Tests that kill the router or the workers are in
test_agg_cluster.py.
"""
from __future__ import annotations

import pytest
import yaml
from pymongo import monitoring

from tests import aggtools as A
from tests.dasktools import engines
from tests.support import run_zcmd, wait_for
from zarkov import aggregation
from zarkov import config as C

SLOW = "my.slow.SlowTask"  # the article's count, 20 ms per event in map


@pytest.fixture(scope="module", params=engines())
def engine(request) -> str:
    """Every test of this module on each engine (the shared cluster is the engine's)."""
    return request.param


@pytest.fixture
def config(shared_config_file):
    """Config path of this test's database on the module's cluster."""
    return shared_config_file()


# -- the article's example --------------------------------------------------------
def test_article_example_incremental_and_full(db, config, shared_cluster):
    jobs_before = shared_cluster.jobs_known()
    A.register(db)
    A.add_events(db, 300, seed=1)
    res = A.ok(A.aggregate(config, A.NAME))
    assert res.stdout.strip().startswith(f"{A.NAME}: 300 documents in ")
    assert res.stderr == ""  # not on a terminal: only the summary line
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)
    first_run = db.agg_def.find_one({"name": A.NAME})["last_run"]
    assert first_run.year > 1970

    A.add_events(db, 120, keys="aghz", seed=2)  # new keys and existing ones
    A.ok(A.aggregate(config, A.NAME))
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)

    before = list(db[A.TARGET].find())
    res = A.ok(A.aggregate(config, A.NAME))
    assert f"{A.NAME}: 0 documents" in res.stdout
    assert list(db[A.TARGET].find()) == before
    # Nothing new: no job was even sent to the router.
    if jobs_before is not None:  # the router's count (each zcmd has its own gateway)
        assert shared_cluster.jobs_known() - jobs_before == 2

    res = A.ok(A.aggregate(config, A.NAME, "full"))
    assert "420 documents" in res.stdout and "(full)" in res.stdout
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


def test_events_from_other_programs_with_any_id(db, config):
    """Documents written by other programs, with non-ObjectId ids, old or new, count."""
    A.register(db)
    db.event.insert_many([{"_id": f"s{i}", "foo": "x"} for i in range(40)]
                         + [{"_id": i, "foo": "y"} for i in range(30)])
    A.ok(A.aggregate(config, A.NAME))
    assert A.output(db) == {"x": 40, "y": 30}
    # A late batch load (small ids, old timestamps) after a run: still counted.
    db.event.insert_many([{"_id": -i, "foo": "y"} for i in range(1, 11)])
    A.ok(A.aggregate(config, A.NAME))
    assert A.output(db) == {"x": 40, "y": 40}
    A.assert_clean(db)


def test_event_limit_runs_batches_until_nothing_is_left(db, shared_config_file,
                                                       shared_cluster):
    config = shared_config_file(zmr={"event_limit": 60})
    jobs_before = shared_cluster.jobs_known()
    A.register(db)
    A.add_events(db, 150, seed=3)
    res = A.ok(A.aggregate(config, A.NAME))
    assert "150 documents" in res.stdout
    assert A.output(db) == A.python_count(db)
    if jobs_before is not None:
        assert shared_cluster.jobs_known() - jobs_before == 3


def test_xmr_task_with_document_keys(db, config, procs):
    """One xmapreduce job feeding two outputs; compound keys merge across runs."""
    A.register(db, task_name="my.xtasks.TwoWays")

    def expected():
        by_ft, by_t = {}, {}
        for d in db.event.find():
            k = (d["foo"], d["type"])
            by_ft[k] = by_ft.get(k, 0) + 1
            by_t[d["type"]] = by_t.get(d["type"], 0) + 1
        return by_ft, by_t

    def got():
        return ({(d["_id"]["foo"], d["_id"]["type"]): d["value"]
                 for d in db["zagg.x.by_foo_type"].find()}, A.output(db, "zagg.x.by_type"))

    A.add_events(db, 120, keys="abc", seed=13)
    A.ok(A.aggregate(config, A.NAME))
    assert got() == expected()
    db.event.insert_many([{"foo": "a", "type": "other"} for _ in range(3)]
                         + [{"foo": "d", "type": "test"}])
    A.kill_at(procs, config, "applying")
    A.ok(A.aggregate(config, A.NAME))
    assert got() == expected()
    by_ft, by_type = got()
    assert by_type == {"test": 121, "other": 3}
    assert sum(by_ft.values()) == 124 and by_ft[("a", "other")] == 3
    assert by_ft[("d", "test")] == 1
    A.ok(A.aggregate(config, A.NAME, "full"))
    assert got() == expected()
    A.assert_clean(db)


# -- kills -------------------------------------------------------------------------
_prepared = A.prepared

# Kills before the job (marking) and after its outputs are staged (applying, flagging)
# are the aggregation's own steps: the same on every engine.
OUTSIDE_THE_JOB = pytest.mark.any_engine


@pytest.mark.parametrize("kind", A.KINDS)
@pytest.mark.parametrize("point", [pytest.param("marking", marks=OUTSIDE_THE_JOB), "running",
                                   "staged", pytest.param("applying", marks=OUTSIDE_THE_JOB),
                                   pytest.param("flagging", marks=OUTSIDE_THE_JOB)])
def test_killed_incremental_run_then_run_again(db, config, procs, point, kind):
    _prepared(db, kind=kind)
    A.kill_at(procs, config, point)
    assert db.agg_run.count_documents({}) == 1  # the run left pending
    A.add_events(db, 25, seed=6, kind=kind)  # and life goes on
    res = A.ok(A.aggregate(config, A.NAME))
    assert f"left {point}" in res.stdout
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


@pytest.mark.parametrize("kind", A.KINDS)
@pytest.mark.parametrize("point", [pytest.param("marking", marks=OUTSIDE_THE_JOB), "running",
                                   pytest.param("applying", marks=OUTSIDE_THE_JOB),
                                   pytest.param("flagging", marks=OUTSIDE_THE_JOB)])
def test_killed_full_run_then_run_again(db, config, procs, point, kind):
    _prepared(db, kind=kind)
    A.kill_at(procs, config, point, "full")
    res = A.ok(A.aggregate(config, A.NAME))
    assert f"left {point}" in res.stdout
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


@pytest.mark.any_engine
@pytest.mark.parametrize("kind", A.KINDS)
def test_killed_twice_in_a_row(db, config, procs, kind):
    _prepared(db, kind=kind)
    A.kill_at(procs, config, "applying")
    A.kill_at(procs, config, "applying")  # killed again while finishing the first
    A.ok(A.aggregate(config, A.NAME))
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


# -- which way the outputs are written --------------------------------------------------
def test_write_paths_follow_the_server(db, config, monkeypatch, expect_path):
    """A full run replaces its target (renaming the staging collection over it where
    the server can); an incremental run overwrites documents (ReplaceOne upserts where
    the server takes them): on MongoDB's paths wherever the server allows."""
    monkeypatch.syspath_prepend(A.TASKS_DIR)
    cfg = C.load(config)
    A.register(db)
    A.add_events(db, 200, seed=15)
    db[A.TARGET].insert_one({"_id": "stale", "value": 1})
    res = aggregation.run(cfg, A.NAME, full=True)
    expect_path("replace", res.write_paths[A.TARGET])
    assert A.output(db) == A.python_count(db)
    A.add_events(db, 50, keys="az", seed=16)
    res = aggregation.run(cfg, A.NAME)
    expect_path("overwrite", res.write_paths[A.TARGET])
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


# -- what a run writes to the events --------------------------------------------------
class EventWrites(monitoring.CommandListener):
    """Counts what update commands on one database's ``event`` collection did."""

    def __init__(self, database: str):
        self.database = database
        self.requests: dict[int, bool] = {}
        self.statements = self.matched = self.modified = 0

    def started(self, event):
        if (event.database_name == self.database and event.command_name == "update"
                and event.command.get("update") == "event"):
            self.requests[event.request_id] = True
            self.statements += len(event.command.get("updates", ()))

    def succeeded(self, event):
        if self.requests.pop(event.request_id, False):
            self.matched += int(event.reply.get("n", 0))
            self.modified += int(event.reply.get("nModified", 0))

    def failed(self, event):
        self.requests.pop(event.request_id, None)


@pytest.fixture
def event_writes(db):
    """Update commands on this test's events, from clients created from now on."""
    listener = EventWrites(db.name)
    monitoring.register(listener)  # global: it only counts this test's database
    return listener


def test_full_rerun_over_counted_events_writes_nothing_per_event(db, config, monkeypatch,
                                                                event_writes):
    """A full run marks only the events not yet counted and reads the others by their
    flag: over a collection already aggregated it updates no event at all."""
    monkeypatch.syspath_prepend(A.TASKS_DIR)
    cfg = C.load(config)
    A.register(db)
    A.add_events(db, 300, seed=31)
    assert aggregation.run(cfg, A.NAME).docs == 300
    assert event_writes.modified == 600  # marked, then flagged: once each
    before = list(db.event.find())

    for _ in range(2):
        event_writes.modified = event_writes.matched = 0
        res = aggregation.run(cfg, A.NAME, full=True)
        assert res.docs == 300
        assert A.output(db) == A.python_count(db)
        assert (event_writes.matched, event_writes.modified) == (0, 0)
    assert list(db.event.find()) == before
    A.assert_clean(db)

    # New events among them: a full run writes those (mark, flag), and only those.
    A.add_events(db, 40, keys="az", seed=32)
    event_writes.modified = 0
    res = aggregation.run(cfg, A.NAME, full=True)
    assert res.docs == 340
    assert event_writes.modified == 80
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


def test_incremental_run_with_nothing_new_writes_no_run_record(db, config, monkeypatch,
                                                                event_writes):
    monkeypatch.syspath_prepend(A.TASKS_DIR)
    cfg = C.load(config)
    A.register(db)
    A.add_events(db, 50, seed=33)
    aggregation.run(cfg, A.NAME)
    event_writes.statements = 0
    res = aggregation.run(cfg, A.NAME)
    assert (res.docs, res.run_id, event_writes.statements) == (0, None, 0)
    assert db.agg_def.find_one({"name": A.NAME})["last_run"].year > 1970
    A.assert_clean(db)


# -- concurrency ----------------------------------------------------------------------
@pytest.mark.any_engine
def test_second_aggregate_exits_at_once_while_first_runs(db, config, procs):
    _prepared(db)
    first = A.start_paused(procs, config, "running")
    res = A.aggregate(config, A.NAME)
    assert res.returncode == 3
    assert "already being aggregated by pid" in res.stderr and "--wait" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    A.kill(procs, first, config)
    A.ok(A.aggregate(config, A.NAME))
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


@pytest.mark.any_engine
def test_second_aggregate_waits_with_wait(db, config, procs):
    _prepared(db, SLOW)  # 180 new events: the first run's job maps for 3.6 s
    first = procs.zcmd("first", config, "aggregate", A.NAME, env=A.ENV)
    wait_for(lambda: A.running(db), what="the first run's job")
    second = procs.zcmd("second", config, "aggregate", A.NAME, "--wait", env=A.ENV)
    A.add_events(db, 30, seed=7)
    assert A.running(db), "the first run ended before the test could act"
    assert first.wait(60) == 0, procs.log("first")
    assert second.wait(60) == 0, procs.log("second")
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


@pytest.mark.parametrize("kind", A.KINDS)
def test_events_arriving_during_a_run_go_to_the_next(db, config, procs, kind):
    A.register(db, task_name=SLOW)
    A.add_events(db, 150, keys="ab", seed=8, kind=kind)  # its job maps for 3 s
    expected_first = A.python_count(db)
    p = procs.zcmd("agg", config, "aggregate", A.NAME, env=A.ENV)
    wait_for(lambda: A.running(db), what="the job")
    A.add_events(db, 50, keys="bc", seed=9, kind=kind)
    assert A.running(db), "the run ended before the test could act"
    assert p.wait(60) == 0, procs.log("agg")
    assert A.output(db) == expected_first
    if kind == "other":
        assert db.event.count_documents({"aggregates": A.NAME}) == 150
    else:
        assert list(A.counted_positions(db).values()) == [150]
    A.ok(A.aggregate(config, A.NAME))
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


@pytest.mark.parametrize("kind", A.KINDS)
def test_two_aggdefs_over_the_same_events(db, config, procs, kind):
    """Marks and flags (or positions) of two AggDefs over the same documents do not
    disturb each other."""
    A.register(db)
    A.register(db, "types", task_name="my.more.CountTypes")
    A.add_events(db, 150, seed=10, kind=kind)
    db.event.insert_many([{"foo": "a", "type": t} for t in ("x", "y", "y")])
    a = procs.zcmd("a", config, "aggregate", A.NAME, env=A.ENV)
    b = procs.zcmd("b", config, "aggregate", "types", "full", env=A.ENV)
    assert a.wait(90) == 0, procs.log("a")
    assert b.wait(90) == 0, procs.log("b")
    assert A.output(db) == A.python_count(db)
    assert A.output(db, "zagg.types") == {"test": 150, "x": 1, "y": 2}
    A.assert_clean(db)
    A.assert_clean(db, "types")


# -- bad input -------------------------------------------------------------------------
def _untouched(db, before_output):
    assert A.output(db) == before_output
    assert db.event.count_documents({"aggregates": A.NAME}) == 0
    A.assert_clean(db, all_flagged=False)


@pytest.fixture
def with_output(db):
    """Events not yet aggregated and an output collection that must stay as it is."""
    db[A.TARGET].insert_many([{"_id": "a", "value": 1000}, {"_id": "q", "value": 5}])
    A.add_events(db, 60, seed=11)
    return A.output(db)


@pytest.mark.any_engine
def test_unknown_name_lists_known_ones(db, config, with_output):
    A.register(db)
    A.register(db, "another")
    res = A.aggregate(config, "nope")
    assert res.returncode == 2
    assert res.stderr.strip() == ("zcmd aggregate: no aggregation definition named 'nope'; "
                                  "known: another, my_agg_def")
    _untouched(db, with_output)


@pytest.mark.parametrize("task_name,message", [
    ("nosuch.module.Task", "cannot import nosuch.module"),
    ("my.tasks.Missing", "module my.tasks has no Missing"),
    ("bad.NotATask", "is not a subclass of zarkov.task.Task"),
    ("bad.NoStartJobs", "does not override _start_jobs"),
    ("NoDots", "is not a dotted path"),
])
@pytest.mark.any_engine
def test_bad_task_name(db, config, with_output, task_name, message):
    A.register(db, task_name=task_name)
    res = A.aggregate(config, A.NAME)
    assert res.returncode == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    _untouched(db, with_output)


def test_map_raising_shows_worker_traceback(db, config, with_output):
    A.register(db, task_name="bad.RaisingMap")
    db.event.insert_one({"foo": "boom"})
    res = A.aggregate(config, A.NAME)
    assert res.returncode == 1
    first, *rest = res.stderr.strip().splitlines()
    assert first.startswith("zcmd aggregate: my_agg_def: mapreduce job into zagg.my_agg "
                            "failed: ValueError: cannot map boom")
    assert "Traceback" in rest[0] and "bad_map" in "\n".join(rest)
    _untouched(db, with_output)


@pytest.mark.any_engine
def test_start_jobs_raising(db, config, with_output):
    A.register(db, task_name="bad.RaisingStart")
    res = A.aggregate(config, A.NAME)
    assert res.returncode == 1
    assert "RaisingStart._start_jobs raised ValueError: no jobs today" in res.stderr
    _untouched(db, with_output)


def test_router_not_answering(db, config_file, with_output):
    config = config_file(zmr={"max_chunk_timeout": 3})
    A.register(db)
    res = A.aggregate(config, A.NAME)  # nothing listens on zmr.req_uri
    assert res.returncode == 1
    uri = yaml.safe_load(open(config))["zmr"]["req_uri"]
    assert f"no answer from {uri} (zmr.req_uri) within 3 s" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    _untouched(db, with_output)


# -- the other commands --------------------------------------------------------------
ARTICLE_REGISTRATION = """\
from ming.orm import session
from zarkov import model as M

M.AggDef(name='my_agg_def', task_name='my.tasks.MyTask')
session(M.AggDef).flush()
"""


def test_register_with_script_as_in_the_article(db, config, tmp_path):
    script = tmp_path / "register.py"
    script.write_text(ARTICLE_REGISTRATION + "import sys; print(sys.argv[1:])\n")
    res = run_zcmd(config, "script", str(script), "x", "--y")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "['x', '--y']"
    agg = db.agg_def.find_one({"name": "my_agg_def"})
    assert agg["object"] == "event" and agg["last_run"].year == 1970
    # A second registration of the same name is refused by the unique index.
    res = run_zcmd(config, "script", str(script), "x")
    assert res.returncode != 0 and "duplicate key" in res.stderr
    A.add_events(db, 50, seed=12)
    A.ok(A.aggregate(config, A.NAME))
    assert A.output(db) == A.python_count(db)


@pytest.mark.any_engine
def test_shell_namespace(db, config):
    res = run_zcmd(config, "shell", "-c", ARTICLE_REGISTRATION
                   + "print(type(M.doc_session.db).__name__, M.doc_session.db.name, ZM)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[:2] == ["Database", db.name]
    assert db.agg_def.count_documents({"name": "my_agg_def"}) == 1


@pytest.mark.any_engine
def test_init_refuses_without_terminal_or_force(db, config):
    db.event.insert_one({"foo": 1})
    res = run_zcmd(config, "init")
    assert res.returncode == 2 and "--force" in res.stderr
    assert db.event.count_documents({}) == 1
    res = run_zcmd(config, "init", "--force")
    assert res.returncode == 0, res.stderr
    assert db.name not in db.client.list_database_names()
