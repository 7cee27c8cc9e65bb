"""The aggregation service on the real map-reduce cluster: zcmd zmr-router, zcmd
zmr-worker (2 processes) and zcmd aggregate, all real processes, against the test
database server.  The aggregation logic itself is tested in test_agg_engine.py."""
from __future__ import annotations

import signal

import pytest
import yaml

from tests import aggtools as A
from tests.support import run_zcmd, wait_for
from zarkov import wire


class Cluster:
    """Router and worker pool of one test, restartable."""

    def __init__(self, procs, path):
        self.procs, self.path = procs, path
        self.uri = yaml.safe_load(open(path))["zmr"]["req_uri"]
        self.router = self.workers = None
        self.n = 0

    def start_router(self):
        self.n += 1
        self.router = self.procs.zcmd(f"router{self.n}", self.path, "zmr-router")
        wait_for(lambda: wire.request(self.uri, {"$command": "echo"}, timeout=1.0),
                 timeout=30, what="the router to answer")

    def start_workers(self):
        self.n += 1
        self.workers = self.procs.zcmd(f"workers{self.n}", self.path, "zmr-worker")

    def start(self):
        self.start_router()
        self.start_workers()
        return self


@pytest.fixture
def agg_cluster(procs, config_file):
    """Like conftest's cluster, with a short zmr.max_chunk_timeout, and restartable."""
    path = config_file(zmr={"max_chunk_timeout": 4}, agg_lease_seconds=30)
    return Cluster(procs, path).start()


def _running(db):
    run = db.agg_run.find_one({})
    return run is not None and run["state"] == "running" and run["attempt"] >= 1


def test_article_example_on_the_cluster(db, agg_cluster, tmp_path):
    script = tmp_path / "register.py"
    script.write_text("from ming.orm import session\nfrom zarkov import model as M\n\n"
                      "M.AggDef(name='my_agg_def', task_name='my.tasks.MyTask')\n"
                      "session(M.AggDef).flush()\n")
    assert run_zcmd(agg_cluster.path, "script", str(script)).returncode == 0
    A.add_events(db, 400, seed=21)
    res = A.ok(A.aggregate(agg_cluster.path, A.NAME))
    assert res.stdout.startswith("my_agg_def: 400 documents in ")
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)

    A.add_events(db, 150, keys="aqz", seed=22)
    A.ok(A.aggregate(agg_cluster.path, A.NAME))
    assert A.output(db) == A.python_count(db)

    before = list(db[A.TARGET].find())
    assert "0 documents" in A.ok(A.aggregate(agg_cluster.path, A.NAME)).stdout
    assert list(db[A.TARGET].find()) == before

    A.ok(A.aggregate(agg_cluster.path, A.NAME, "full"))
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


def test_worker_killed_during_run(db, agg_cluster, procs):
    A.register(db, task_name="my.slow.SlowTask")
    A.add_events(db, 300, seed=23)
    agg = procs.zcmd("agg", agg_cluster.path, "aggregate", A.NAME, env=A.ENV)
    wait_for(lambda: _running(db), what="the run's jobs")
    procs.kill(agg_cluster.workers, signal.SIGKILL)
    agg_cluster.start_workers()
    code = agg.wait(120)
    if code != 0:  # the run may give up; then it is simply run again
        A.ok(A.aggregate(agg_cluster.path, A.NAME))
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


def test_router_killed_during_run(db, agg_cluster, procs):
    A.register(db, task_name="my.slow.SlowTask")
    A.add_events(db, 300, seed=24)
    A.ok(A.aggregate(agg_cluster.path, A.NAME))
    A.add_events(db, 200, keys="abq", seed=25)
    agg = procs.zcmd("agg", agg_cluster.path, "aggregate", A.NAME, env=A.ENV)
    wait_for(lambda: _running(db), what="the run's jobs")
    procs.kill(agg_cluster.router, signal.SIGKILL)
    assert agg.wait(60) == 1
    assert "(zmr.req_uri) within 4 s; nothing was changed" in procs.log("agg")
    assert db.event.count_documents({"aggregates": A.NAME}) == 300
    procs.kill(agg_cluster.workers, signal.SIGKILL)
    agg_cluster.start()
    A.ok(A.aggregate(agg_cluster.path, A.NAME))
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


def test_map_raising_on_a_worker(db, agg_cluster):
    A.register(db, task_name="bad.RaisingMap")
    A.add_events(db, 50, seed=26)
    db.event.insert_one({"foo": "boom"})
    res = A.aggregate(agg_cluster.path, A.NAME)
    assert res.returncode == 1
    assert "ValueError: cannot map boom" in res.stderr.splitlines()[0]
    assert "Traceback" in res.stderr and "bad_map" in res.stderr
    assert A.output(db) == {}
    A.assert_clean(db, all_flagged=False)
    assert db.event.count_documents({"aggregates": A.NAME}) == 0


def test_xmr_task_on_the_cluster(db, agg_cluster):
    A.register(db, task_name="my.xtasks.TwoWays")
    A.add_events(db, 200, keys="abcd", seed=27)
    A.ok(A.aggregate(agg_cluster.path, A.NAME))
    db.event.insert_many([{"foo": "e", "type": "late"} for _ in range(5)])
    A.ok(A.aggregate(agg_cluster.path, A.NAME))
    by_type = A.output(db, "zagg.x.by_type")
    assert by_type == {"test": 200, "late": 5}
    by_ft = {(d["_id"]["foo"], d["_id"]["type"]): d["value"]
             for d in db["zagg.x.by_foo_type"].find()}
    assert sum(by_ft.values()) == 205 and by_ft[("e", "late")] == 5
    assert by_ft == {(f, "test"): n for f, n in A.python_count(db).items() if f != "e"} | {
        ("e", "late"): 5}
    A.assert_clean(db)
