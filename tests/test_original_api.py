"""The original call forms of ``ZarkovClient`` and ``Task`` keep working (issue 18).

Written from the signatures the 2011 article (../shared/seeds/) and SPEC.md give:

* ``_start_jobs(self, socket, full)``, called by ``run`` with the socket and ``full``
  (article, "Task Definitions"; SPEC 5); the base raises NotImplementedError;
* ``start_mr(self, socket, collection, full, filter=None, map=None, reduce=None,
  map_name=None, reduce_name=None)``, positional or keyword; ``collection`` a
  collection of ``M.doc_session.db``; ``replace`` when ``full``, else ``reduce``
  (article; SPEC 5); ``finalize`` as SPEC 4 describes it;
* ``{"jobs": self._lock_id}`` selects exactly the run's documents (article; SPEC 5);
* ``run`` is called with a REQ socket connected to the router (article; SPEC 5);
* events are ``type``, ``context``, ``extra`` (SPEC 3), sent with
  ``event(type, context, extra=None)`` and ``event_noval(type, context, extra=None)``.

Pure tests catch the jobs a Task sends (``jobclient.submit`` replaced) or read the
client's messages off a PULL socket; the end-to-end ones run the module's shared
router and workers, an event logger and ``zcmd aggregate``, and read ``zagg.*``.
"""
from __future__ import annotations

import collections

import bson
import pytest
import zmq

from tests import aggtools as A
from tests.eventlog_util import load, start_logger
from tests.support import free_port, wait_for
from zarkov import config as C
from zarkov import model as M
from zarkov import wire
from zarkov.client import ZarkovClient
from zarkov.task import RunContext, Task, TaskError
from zarkov.zmr import jobclient


# -- the article's functions, as a user's module holds them -----------------------------
# The article names them map and reduce (the builtins are shadowed, as there).
def map(objects):
    for object in objects:
        yield (object.get("context") or {}).get("user"), 1


def reduce(key, values):
    return sum(values)


def with_parity(objects):
    for o in objects:
        yield {"_id": o["_id"], "value": {"n": o["value"], "even": o["value"] % 2 == 0}}


#: The same map and reduce as source text, for start_mr's map_name/reduce_name.
MAP_TEXT = '''
def by_user(objects):
    for o in objects:
        yield (o.get("context") or {}).get("user"), 1
'''
REDUCE_TEXT = '''
def add(key, values):
    return sum(values)
'''


class Positional(Task):
    """start_mr by position, the article's order, with its lock filter."""

    def _start_jobs(self, socket, full):
        db = M.doc_session.db
        self.start_mr(socket, db.zagg.by_user, full, {"jobs": self._lock_id},
                      MAP_TEXT, REDUCE_TEXT, "by_user", "add")


class Keyword(Task):
    """start_mr by keyword, every argument named, the lock filter and one of the user's."""

    def _start_jobs(self, socket, full):
        self.start_mr(socket=socket, collection="zagg.downloads", full=full,
                      filter={"jobs": self._lock_id, "type": "download"},
                      map=map, reduce=reduce, map_name="map", reduce_name="reduce")


class OriginalForms(Positional, Keyword):
    """Both jobs in one run (what ``zcmd aggregate`` runs below)."""

    def _start_jobs(self, socket, full):
        Positional._start_jobs(self, socket, full)
        Keyword._start_jobs(self, socket, full)


# -- pure: the jobs a Task sends ---------------------------------------------------------
@pytest.fixture
def sent(monkeypatch):
    """The requests Tasks submit (decoded query), instead of sending them to a router."""
    requests: list[dict] = []

    def submit(sock, request, timeout=10.0):
        requests.append({**request, "query": bson.decode(request["query"])})
        return f"job{len(requests)}"
    monkeypatch.setattr(jobclient, "submit", submit)
    return requests


def _job(request: dict) -> dict:
    """What a job does, without the shipped source text."""
    return {k: v for k, v in request.items() if not k.endswith("_text")}


def test_start_mr_positional_and_keyword_send_the_same_job(sent, mim):
    cfg = C.from_dict({"mongo_database": "zt_orig"})

    class Both(Task):
        def _start_jobs(self, socket, full):
            coll = M.doc_session.db.zagg.my_agg
            self.start_mr(socket, coll, full, {"type": "x"}, map, reduce, "map", "reduce")
            self.start_mr(socket=socket, collection=coll, full=full, filter={"type": "x"},
                          map=map, reduce=reduce, map_name="map", reduce_name="reduce")
            self.start_mr(socket, coll, full, filter={"type": "x"}, map=map, reduce=reduce)

    for full, mode in ((True, "replace"), (False, "reduce")):
        sent.clear()
        Both(None, cfg)._start_jobs(None, full)
        assert len(sent) == 3
        assert _job(sent[0]) == _job(sent[1]) == _job(sent[2]) == {
            "$command": "mapreduce", "query": {"type": "x"}, "map_name": "map",
            "reduce_name": "reduce", "database": "zt_orig", "input_names": ["event"],
            "output_name": "zagg.my_agg", "output_type": mode}
        assert sent[0]["map_text"].startswith("def map(objects):")


def test_lock_filter_is_the_runs_selection_in_either_form(sent):
    """``{"jobs": self._lock_id}``, by position or keyword, reads the run's documents:
    those it marked and the positions it took, alone or with the user's own filter."""
    selection = {"$or": [{"_id": {"$gt": 1, "$lte": 9}}, {"jobs": "L7"}]}
    task = OriginalForms(None, C.from_dict({}),
                         RunContext("L7", 1, "zstage.L7.1.", selection=selection))
    assert task._lock_id == "L7"
    task._start_jobs(None, False)
    assert [r["query"] for r in sent] == [selection, {"$and": [selection, {"type": "download"}]}]
    # Under the engine both write fresh staging collections, applied later.
    assert [(r["output_name"], r["output_type"]) for r in sent] == [
        ("zstage.L7.1.0", "replace"), ("zstage.L7.1.1", "replace")]


def test_run_calls_start_jobs_with_socket_and_full():
    calls = []

    class Recording(Task):
        def _start_jobs(self, sock, is_full):  # the article's two, by position
            calls.append((sock, is_full))

    task = Recording(None, C.from_dict({}))
    assert task.run("the socket") == 0
    assert task.run("the socket", True) == 0
    assert task.run(socket="the socket", full=False) == 0
    assert calls == [("the socket", False), ("the socket", True), ("the socket", False)]
    with pytest.raises(NotImplementedError, match="_start_jobs"):
        Task(None, C.from_dict({})).run(None, True)


def test_misplaced_arguments_name_the_original_signature(sent):
    task = Task(None, C.from_dict({}))
    # map and reduce where filter and map go: the message gives the order.
    with pytest.raises(TaskError, match=r"filter must be a query document or None, got "
                       r"function 'map': the arguments are start_mr\(socket, collection, "
                       r"full, filter=None, map=None, reduce=None, map_name=None, "
                       r"reduce_name=None\); give map and reduce by keyword"):
        task.start_mr(None, "zagg.x", True, map, reduce)
    with pytest.raises(TaskError, match="map_name 'mapper' is not the name of the map "
                                        "function 'map'"):
        task.start_mr(None, "zagg.x", True, None, map, reduce, "mapper")
    with pytest.raises(TaskError, match="reduce given as source text needs reduce_name"):
        task.start_mr(None, "zagg.x", True, None, MAP_TEXT, REDUCE_TEXT, "by_user")
    assert sent == []  # nothing reached the router


# -- pure: the client's messages ----------------------------------------------------------
def test_client_original_call_forms_on_the_wire():
    """What the event logger receives from ``ZarkovClient(uri)`` and the original calls."""
    uri = f"tcp://127.0.0.1:{free_port()}"
    pull = wire.context().socket(zmq.PULL)
    pull.bind(uri)
    try:
        with ZarkovClient(uri) as client:
            assert client.event("login", {"user": "ann"}, {"seq": 1})
            assert client.event(type="download", context={"user": "bob"}, extra={"seq": 2})
            assert client.event("logout", {"user": "cy"})
            assert client.event_noval("raw", {"user": "di"}, [4])
            assert client.event_noval(type="raw", context={"user": "ed"}, extra={"seq": 5})
        got = []
        while pull.poll(5000):
            got.append(bson.decode(pull.recv()))
            if len(got) == 5:
                break
    finally:
        pull.close(0)
    assert got == [
        {"type": "login", "context": {"user": "ann"}, "extra": {"seq": 1}},
        {"type": "download", "context": {"user": "bob"}, "extra": {"seq": 2}},
        {"type": "logout", "context": {"user": "cy"}},
        {"$command": "event_noval", "type": "raw", "context": {"user": "di"}, "extra": [4]},
        {"$command": "event_noval", "type": "raw", "context": {"user": "ed"},
         "extra": {"seq": 5}},
    ]


# -- end to end: the module's router and workers --------------------------------------------
@pytest.fixture
def router_config(shared_cluster, mongo_uri, db_name):
    """A config of this test's database whose zmr.req_uri is the module's router; the
    model bound to it (the article's tasks name their output ``M.doc_session.db.…``)."""
    cfg = C.from_dict({"mongo_uri": mongo_uri, "mongo_database": db_name,
                       "zmr": {"req_uri": shared_cluster.uri, "max_chunk_timeout": 4}})
    M.configure(cfg)
    yield cfg
    M._bound = None


def _out(db, name: str) -> dict:
    return {d["_id"]: d["value"] for d in db[name].find()}


def test_task_by_hand_in_the_original_forms(db, router_config):
    """Run by hand (no engine), jobs write straight to zagg.*: replace when full, else
    reduce into what is there; a finalize given by keyword shapes what is stored."""
    users = ["ann", "bob", "ann", "cy", "ann", "bob"]
    db.event.insert_many([{"type": "download" if i % 2 else "login", "context": {"user": u}}
                          for i, u in enumerate(users)])
    db["zagg.by_user"].insert_one({"_id": "gone", "value": 9})  # replaced by a full run

    class Finalized(Task):
        def _start_jobs(self, socket, full):
            self.start_mr(socket, "zagg.parity", full, map=map, reduce=reduce,
                          finalize=with_parity)

    sock = wire.req_socket(router_config.zmr.req_uri)
    try:
        task = Positional(None, router_config)
        assert task.run(sock, True) == 6  # the documents read
        assert _out(db, "zagg.by_user") == {"ann": 3, "bob": 2, "cy": 1}
        assert task.run(socket=sock, full=False) == 6  # reduce: added to what is there
        assert _out(db, "zagg.by_user") == {"ann": 6, "bob": 4, "cy": 2}
        Keyword(None, router_config).run(sock, full=True)
        assert _out(db, "zagg.downloads") == {"bob": 2, "cy": 1}
        Finalized(None, router_config).run(sock, full=True)
        assert _out(db, "zagg.parity") == {"ann": {"n": 3, "even": False},
                                           "bob": {"n": 2, "even": True},
                                           "cy": {"n": 1, "even": False}}
    finally:
        sock.close(0)


def _send(uri: str, users: list[str], start: int) -> None:
    """Events through the original client's forms, in turn."""
    with ZarkovClient(uri) as client:
        for i, user in enumerate(users, start):
            form = i % 3
            if form == 0:
                client.event("download", {"user": user}, {"seq": i})
            elif form == 1:
                client.event(type="login", context={"user": user}, extra={"seq": i})
            else:
                client.event_noval("download", {"user": user}, {"seq": i})
        assert client.sent == len(users) and client.dropped == 0


def _expected(db) -> tuple[dict, dict]:
    """What zagg.by_user and zagg.downloads must hold: counted here from the events."""
    events = list(db.event.find())
    return (dict(collections.Counter(e["context"]["user"] for e in events)),
            dict(collections.Counter(e["context"]["user"] for e in events
                                     if e["type"] == "download")))


def test_original_client_and_task_through_zcmd_aggregate(db, shared_config_file,
                                                         procs, tmp_path):
    """Events sent with the original client, counted by ``zcmd aggregate`` running a Task
    written in the original forms: incrementally twice, then as a full recompute."""
    port = free_port()
    config = shared_config_file(journal=str(tmp_path / "journal"),
                                bson_bind_address=f"tcp://127.0.0.1:{port}",
                                bson_uri=f"tcp://127.0.0.1:{port}")
    start_logger(procs, config)
    uri = load(config)["bson_uri"]
    A.register(db, name="orig", task_name="tests.test_original_api.OriginalForms")

    _send(uri, ["ann", "bob", "ann", "cy", "bob", "ann", "di"], 0)
    # ... and events another program wrote: counted by their marks.
    db.event.insert_many([{"type": "download", "context": {"user": "ed"}},
                          {"type": "login", "context": {"user": "ann"}}])
    wait_for(lambda: db.event.count_documents({}) == 9, what="9 events stored")
    res = A.ok(A.aggregate(config, "orig"))
    assert "orig: 9 documents" in res.stdout
    by_user, downloads = _expected(db)
    assert by_user == {"ann": 4, "bob": 2, "cy": 1, "di": 1, "ed": 1}
    assert (_out(db, "zagg.by_user"), _out(db, "zagg.downloads")) == (by_user, downloads)

    _send(uri, ["cy", "ann", "fay", "bob"], 7)
    wait_for(lambda: db.event.count_documents({}) == 13, what="13 events stored")
    res = A.ok(A.aggregate(config, "orig"))
    assert "orig: 4 documents" in res.stdout  # only the new ones were read
    by_user, downloads = _expected(db)
    assert by_user["ann"] == 5 and by_user["fay"] == 1
    assert (_out(db, "zagg.by_user"), _out(db, "zagg.downloads")) == (by_user, downloads)

    res = A.ok(A.aggregate(config, "orig", "full"))
    assert "orig: 13 documents" in res.stdout and "(full)" in res.stdout
    assert (_out(db, "zagg.by_user"), _out(db, "zagg.downloads")) == (by_user, downloads)
    A.assert_clean(db, name="orig")
