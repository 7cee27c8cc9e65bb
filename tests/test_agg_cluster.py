"""The aggregation service when the map-reduce cluster's processes or the database
server die mid-run: each test starts its own zcmd zmr-router and zcmd zmr-worker (2
processes), kills one of them (or a private database server of the kind under test)
while a zcmd aggregate runs, and checks the outputs.  Everything else about
aggregation, on one shared cluster, is in test_agg_engine.py."""
from __future__ import annotations

import signal

import pymongo
import pytest

from tests import aggtools as A
from tests.support import Cluster, wait_for


@pytest.fixture
def agg_cluster(procs, config_file):
    """Like conftest's cluster, with a short zmr.max_chunk_timeout; a Cluster (restartable)."""
    path = config_file(zmr={"max_chunk_timeout": 4}, agg_lease_seconds=30)
    return Cluster(procs, path).start()


def test_worker_killed_during_run(db, agg_cluster, procs):
    A.register(db, task_name="my.slow.SlowTask")
    A.add_events(db, 300, seed=23)
    agg = procs.zcmd("agg", agg_cluster.path, "aggregate", A.NAME, env=A.ENV)
    wait_for(lambda: A.running(db), what="the run's jobs")
    procs.kill(agg_cluster.workers, signal.SIGKILL)
    agg_cluster.start_workers()
    code = agg.wait(120)
    if code != 0:  # the run may give up; then it is simply run again
        A.ok(A.aggregate(agg_cluster.path, A.NAME))
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


def test_router_killed_during_run(db, agg_cluster, procs):
    A.register(db, task_name="my.slow.SlowTask")
    A.add_events(db, 60, seed=24)  # a first run's output (20 ms an event in map)
    A.ok(A.aggregate(agg_cluster.path, A.NAME))
    A.add_events(db, 100, keys="abq", seed=25)
    agg = procs.zcmd("agg", agg_cluster.path, "aggregate", A.NAME, env=A.ENV)
    wait_for(lambda: A.running(db), what="the run's jobs")
    procs.kill(agg_cluster.router, signal.SIGKILL)
    assert agg.wait(60) == 1
    assert "(zmr.req_uri) within 4 s; nothing was changed" in procs.log("agg")
    assert db.event.count_documents({"aggregates": A.NAME}) == 60
    procs.kill(agg_cluster.workers, signal.SIGKILL)
    agg_cluster.start()
    A.ok(A.aggregate(agg_cluster.path, A.NAME))
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


@pytest.mark.parametrize("point,mode", [("running", ""), ("applying", ""),
                                        ("applying", "full")])
def test_database_server_killed_during_run(procs, config_file, private_server, point, mode):
    """SIGKILL the database server (and the paused run) mid-run; start it again: what it
    acknowledged is still there (the java server's H2 file, FerretDB's SQLite WAL) and
    the next run finishes the killed one exactly."""
    database = private_server.start()
    path = config_file(mongo_uri=database.uri, mongo_database="zkill",
                       zmr={"max_chunk_timeout": 4}, agg_lease_seconds=30)
    client = pymongo.MongoClient(database.uri)
    db = client.zkill
    try:
        cluster = Cluster(procs, path).start()
        A.prepared(db)
        args = [mode] if mode else []
        run = A.start_paused(procs, path, point, *args)
        database.kill()
        procs.kill(run, signal.SIGKILL)
        database.start()
        cluster.wait_idle()
        assert db.agg_run.count_documents({"state": point}) == 1  # the run left pending
        res = A.ok(A.aggregate(path, A.NAME))
        assert f"left {point}" in res.stdout
        assert A.output(db) == A.python_count(db)
        A.assert_clean(db)
    finally:
        client.close()
