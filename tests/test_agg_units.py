"""Tests of the aggregation pieces: the model (mim://), leases, Tasks run by hand on the
real map-reduce cluster (one router and 2 worker processes for the module)."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from datetime import datetime, timedelta

import pytest

from tests.support import free_port
from zarkov import config as C
from zarkov import lease as L
from zarkov import model as M
from zarkov import wire
from zarkov.task import JobFailed, RunContext, Task, TaskError


# -- model -------------------------------------------------------------------------
def test_register_as_in_the_article(mim):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ming.orm is ming.odm's alias
        from ming.orm import session
    M.AggDef(name='my_agg_def', task_name='my.tasks.MyTask')
    session(M.AggDef).flush()
    raw = M.doc_session.db.agg_def.find_one()
    assert raw["object"] == "event" and raw["last_run"] == datetime(1970, 1, 1)
    assert raw["realtime"] is False and raw["task_name"] == "my.tasks.MyTask"
    assert M.AggDef.by_name("my_agg_def").task_name == "my.tasks.MyTask"
    assert M.AggDef.by_name("nope") is None
    M.AggDef(name="b", task_name="x.Y", object="other")
    session(M.AggDef).flush()
    assert M.AggDef.names() == ["b", "my_agg_def"]


def test_by_name_sees_changes_made_by_others(mim):
    M.AggDef(name="a", task_name="x.Y")
    M.orm_session.flush()
    assert M.AggDef.by_name("a").task_name == "x.Y"
    M.db().agg_def.update_one({"name": "a"}, {"$set": {"task_name": "new.Z"}})
    assert M.AggDef.by_name("a").task_name == "new.Z"


def test_configure_binds_and_rebinds(mim):
    assert M.db().name == "zt_mim"
    M.configure(C.from_dict({"mongo_uri": "mim://", "mongo_database": "zt_mim2"}))
    assert M.doc_session.db.name == "zt_mim2"


# -- leases --------------------------------------------------------------------------
@pytest.fixture
def leases(db):
    return db.agg_lease


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lease_is_exclusive_and_released(leases):
    a = L.Lease(leases, "x", 30)
    a.acquire()
    b = L.Lease(leases, "x", 30)
    with pytest.raises(L.LeaseBusy) as e:
        b.acquire()
    assert e.value.holder["pid"] == os.getpid()
    b.release()  # not ours: must not remove a's lease
    assert leases.count_documents({"_id": "x"}) == 1
    a.release()
    b.acquire()
    b.release()
    assert leases.count_documents({}) == 0


def test_stale_leases_are_taken_over(leases):
    now = datetime.utcnow()
    leases.insert_one({"_id": "dead", "token": "t", "host": L.HOST, "pid": _dead_pid(),
                       "expires": now + timedelta(hours=1)})
    leases.insert_one({"_id": "far", "token": "t", "host": "elsewhere", "pid": 1,
                       "expires": now - timedelta(seconds=1)})
    leases.insert_one({"_id": "alive", "token": "t", "host": "elsewhere", "pid": 1,
                       "expires": now + timedelta(hours=1)})
    for key in ("dead", "far"):
        lease = L.Lease(leases, key, 30)
        lease.acquire()
        assert leases.find_one({"_id": key})["token"] == lease.token
    with pytest.raises(L.LeaseBusy):
        L.Lease(leases, "alive", 30).acquire()


def test_renewal_notices_a_lost_lease(leases):
    a = L.Lease(leases, "x", 30)
    a.acquire()
    a.renew()
    leases.update_one({"_id": "x"}, {"$set": {"token": "someone else"}})
    with pytest.raises(L.LeaseLost):
        a.renew()
    with pytest.raises(L.LeaseLost):
        a.check()
    a.release()
    assert leases.count_documents({"_id": "x"}) == 1  # the new holder's stays


def test_wait_for_a_lease(leases):
    a = L.Lease(leases, "x", 30)
    a.acquire()
    b = L.Lease(leases, "x", 30)
    with pytest.raises(L.LeaseBusy):
        b.acquire(wait=True, timeout=0.3, poll=0.05)
    a.release()
    b.acquire(wait=True, timeout=5, poll=0.05)
    b.release()


# -- Task --------------------------------------------------------------------------
def count_foo(objects):
    for o in objects:
        yield o["foo"], 1


def add(key, values):
    return sum(values)


class Counting(Task):
    def _start_jobs(self, socket, full):
        self.start_mr(socket, "zagg.t", full, filter={"foo": {"$ne": "skip"}},
                      map=count_foo, reduce=add)
        self.start_basic_job(socket, add, "k", [2, 3])


@pytest.fixture
def router_config(shared_cluster, mongo_uri, db_name):
    """A config of this test's database whose zmr.req_uri is the module's real router."""
    return C.from_dict({"mongo_uri": mongo_uri, "mongo_database": db_name,
                        "zmr": {"req_uri": shared_cluster.uri, "max_chunk_timeout": 4}})


def test_task_without_engine_replaces_or_reduces(db, router_config):
    """Run by hand (no run context), jobs write straight to the target, as in the article."""
    cfg = router_config
    db.event.insert_many([{"foo": "a"}, {"foo": "a"}, {"foo": "b"}, {"foo": "skip"}])
    db["zagg.t"].insert_one({"_id": "old", "value": 7})  # gone in replace mode
    sock = wire.req_socket(cfg.zmr.req_uri)
    task = Counting(None, cfg)
    assert task.run(sock, full=True) == 3
    assert {d["_id"]: d["value"] for d in db["zagg.t"].find()} == {"a": 2, "b": 1}
    assert list(task.results.values()) == [5]
    assert task.run(sock, full=False) == 3  # reduce mode: added to what is there
    assert {d["_id"]: d["value"] for d in db["zagg.t"].find()} == {"a": 4, "b": 2}
    sock.close(0)


def test_task_under_engine_filters_on_lock_and_stages(db, router_config):
    """Jobs read only the run's marked documents (and the task's filter) into staging."""
    cfg = router_config
    db.event.insert_many([{"foo": "a", "jobs": ["L1"]}, {"foo": "a", "jobs": ["L1", "L0"]},
                          {"foo": "skip", "jobs": ["L1"]}, {"foo": "b", "jobs": ["L0"]},
                          {"foo": "c"}])
    db["zagg.t"].insert_one({"_id": "a", "value": 100})  # the target is not touched
    db["zstage.L1.1.0"].insert_one({"_id": "old", "value": 1})  # replaced
    ctx = RunContext("L1", 1, "zstage.L1.1.")
    sock = wire.req_socket(cfg.zmr.req_uri)
    Counting(None, cfg, ctx).run(sock, full=False)
    assert {d["_id"]: d["value"] for d in db["zstage.L1.1.0"].find()} == {"a": 2}
    assert {d["_id"]: d["value"] for d in db["zagg.t"].find()} == {"a": 100}
    assert ctx.outputs[0]["staging"] == "zstage.L1.1.0"
    assert ctx.outputs[0]["target"] == "zagg.t" and ctx.outputs[0]["reduce_name"] == "add"
    sock.close(0)


class ArticleFilter(Task):
    """Filters on {"jobs": self._lock_id} itself, as the article's text suggests."""

    def _start_jobs(self, socket, full):
        self.start_mr(socket, "zagg.t", full, filter={"jobs": self._lock_id},
                      map=count_foo, reduce=add)


def test_full_run_selection_reads_the_flagged_and_the_pinned(db, router_config):
    """A full run's jobs read the events already counted and those its run pinned; the
    article's own lock filter means the same (it is the run's selection already)."""
    cfg = router_config
    db.event.insert_many([{"foo": "a", "aggregates": ["x"]}, {"foo": "a", "jobs": ["L2"]},
                          {"foo": "b", "aggregates": ["other"]}, {"foo": "c"}])
    selection = {"$or": [{"jobs": "L2"}, {"aggregates": "x"}]}
    sock = wire.req_socket(cfg.zmr.req_uri)
    for task_cls in (Counting, ArticleFilter):
        ctx = RunContext("L2", 1, "zstage.L2.1.", selection=selection)
        task = task_cls(None, cfg, ctx)
        assert task.selection == selection
        task.run(sock, full=True)
        assert {d["_id"]: d["value"] for d in db["zstage.L2.1.0"].find()} == {"a": 2}
    sock.close(0)


def test_task_argument_errors(router_config):
    t = Task(None, router_config)
    with pytest.raises(TaskError, match="named module-level"):
        t.start_mr(None, "zagg.t", True, map=lambda objs: objs, reduce=add)
    with pytest.raises(TaskError, match="needs map_name"):
        t.start_mr(None, "zagg.t", True, map="def m(o): pass", reduce=add)
    with pytest.raises(TaskError, match="reduce function is required"):
        t.start_mr(None, "zagg.t", True, map=count_foo)
    with pytest.raises(NotImplementedError):
        t.run(None)


def test_task_router_silent(mongo_uri):
    cfg = C.from_dict({"zmr": {"req_uri": f"tcp://127.0.0.1:{free_port()}",
                               "max_chunk_timeout": 0.5}})
    sock = wire.req_socket(cfg.zmr.req_uri)
    with pytest.raises(JobFailed, match=r"no answer from .* within 0.5 s"):
        Counting(None, cfg).run(sock)
    sock.close(0)
