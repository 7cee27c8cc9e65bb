"""Map-reduce pieces in one process: keys and partitions, chunk cutting, the
worker's computations, request parsing, and the dispatch bookkeeping."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys

import bson
import gevent
import pytest
import zmq
from bson.raw_bson import RawBSONDocument

from tests.support import ROOT, proc_env
from zarkov.bsonkeys import group_key, partition_of
from zarkov.zmr import compute, dispatch, jobspec, reader
from zarkov.zmr.reader import cut_chunks
from zarkov.zmr.spill import Spill

KEYS = ["abc", 7, 7.5, True, None, datetime.datetime(2024, 5, 1, 12, 30),
        {"user": "u1", "day": "2024-05-01"}, {"nested": {"a": [1, 2]}}]


def test_partition_is_the_same_in_every_process():
    # str hashing is salted per process; the partition must not be.
    code = ("import datetime, sys; from zarkov.bsonkeys import partition_of;"
            f"keys = {KEYS!r}; print([partition_of(k, 256) for k in keys])")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env=proc_env({"PYTHONHASHSEED": seed}), check=True).stdout
            for seed in ("1", "2", "3")}
    assert runs == {f"{[partition_of(k, 256) for k in KEYS]}\n"}
    assert len({partition_of(f"k{i}", 8) for i in range(100)}) == 8  # spread over all


def test_group_key_follows_bson_equality():
    assert group_key(1) != group_key(1.0) != group_key(True)
    assert group_key({"a": 1, "b": 2}) != group_key({"b": 2, "a": 1})  # order is identity
    assert group_key({"a": 1}) == group_key({"a": 1})
    d = datetime.datetime(2024, 1, 1, 0, 0, 0, 1500)
    assert group_key(d) == group_key(d.replace(microsecond=1000))  # BSON keeps ms
    assert group_key({"a": 1}) != group_key({"a": 1.0}) != group_key({"a": "1"})
    assert group_key({"a": {"b": 1}}) != group_key({"a": {"b": True}})


@pytest.mark.parametrize("key", KEYS)
def test_group_key_is_the_same_for_a_decoded_and_a_raw_document(key):
    """Merging compares keys read back raw with keys decoded: they must group alike."""
    raw = RawBSONDocument(bson.encode({"_id": key}))["_id"]
    decoded = bson.decode(bson.encode({"_id": key}))["_id"]
    assert group_key(raw) == group_key(decoded)


def docs_bytes(n, start=0):
    return [bson.encode({"_id": i, "pad": "x" * (i % 17)}) for i in range(start, start + n)]


def array(docs: list[bytes]) -> bytes:
    """The raw BSON array of documents a server's batch is."""
    return bson.encode({str(i): bson.decode(d) for i, d in enumerate(docs)})


def test_cut_chunks_keeps_documents_whole_and_under_the_size():
    batches = [array(docs_bytes(50, s)) for s in range(0, 500, 50)]
    chunks = list(cut_chunks(batches, 1000))
    assert all(len(c) <= 1000 for c, _ in chunks)
    ids = [d["_id"] for c, _ in chunks for d in bson.decode_all(c)]
    assert ids == list(range(500))
    assert sum(n for _, n in chunks) == 500
    big = bson.encode({"x": "y" * 5000})
    assert list(cut_chunks([array([big])], 1000)) == [(big, 1)]  # too big: travels alone
    assert list(cut_chunks([array([])], 1000)) == []
    # The pure Python walk (used where bson lacks its C helper) agrees with it.
    assert reader.concatenated(batches[1]) == b"".join(docs_bytes(50, 50))
    with pytest.raises(reader.ReaderError):
        reader.concatenated(bson.encode({"0": 1}))


def test_raw_arrays_read_every_document_in_server_batches(db):
    db.event.insert_many([{"_id": i, "pad": "x" * (i % 17)} for i in range(450)])
    arrays = list(reader.raw_arrays(db, ["event", "missing"], {"_id": {"$gte": 7}},
                                    batch_size=100))
    assert len(arrays) >= 5  # getMore after getMore, then an empty one for "missing"
    ids = [d["_id"] for c, _ in cut_chunks(arrays, 1 << 20) for d in bson.decode_all(c)]
    assert sorted(ids) == list(range(7, 450))
    # A reader stopped early kills its cursor (the server keeps none open).
    it = reader.raw_arrays(db, ["event"], {}, batch_size=10)
    next(it)
    it.close()


def fns(**named):
    return compute.load_functions({what: [f"def {name}{sig}:\n    {body}\n", name]
                                   for what, (name, sig, body) in named.items()})


MAP = ("m", "(objs)", "for o in objs: yield o['k'], 1")
RED = ("r", "(k, vs)", "return sum(vs)")


def test_map_combines_per_chunk_and_partitions():
    chunk = b"".join(bson.encode({"k": k}) for k in ["a", "b", "a", {"x": 1}, "a"])
    n, m, parts = compute.run_map(fns(map=MAP, reduce=RED), chunk, 4)
    assert (n, m) == (5, 3)
    recs = {str(r["k"]): (p, r["v"]) for p, data in parts.items() for r in bson.decode_all(data)}
    assert {k: v for k, (_, v) in recs.items()} == {"a": 3, "b": 1, "{'x': 1}": 1}
    assert recs["a"][0] == partition_of("a", 4) and recs["{'x': 1}"][0] == partition_of({"x": 1}, 4)


def test_reduce_rereduces_and_finalizes():
    data = b"".join(bson.encode({"k": k, "v": v}) for k, v in [("a", 3), ("a", 2), ("b", 1)])
    f = fns(reduce=RED, finalize=("f", "(objs)",
                                  "return ({'_id': o['_id'], 'n': o['value']} for o in objs)"))
    out = compute.run_reduce(f, data)
    assert sorted((d["_id"], d["n"]) for d in bson.decode_all(out[""])) == [("a", 5), ("b", 1)]
    new = b"".join(bson.encode({"_id": k, "value": v}) for k, v in [("a", 5), ("b", 1)])
    old = bson.encode({"_id": "a", "value": 10})
    got = bson.decode_all(compute.run_rereduce(f, new, old))
    assert sorted((d["_id"], d["n"]) for d in got) == [("a", 15), ("b", 1)]


def test_map_reduce_of_a_whole_input_in_one_go():
    chunk = b"".join(bson.encode({"k": k}) for k in ["a", "b", "a", {"x": 1}, "a"])
    f = fns(map=MAP, reduce=RED,
            finalize=("f", "(objs)", "return ({'_id': o['_id'], 'n': o['value']} for o in objs)"))
    n, out = compute.run_map_reduce(f, chunk)
    assert n == 5 and list(out) == [""]
    got = {str(d["_id"]): d["n"] for d in bson.decode_all(out[""])}
    assert got == {"a": 3, "b": 1, "{'x': 1}": 1}
    n, out = compute.run_map_reduce(f, chunk, finalize=False)
    assert {str(d["_id"]): d["value"] for d in bson.decode_all(out[""])}["a"] == 3


def test_load_functions_reports_syntax_errors():
    from zarkov.functions import FunctionError
    with pytest.raises(FunctionError, match="does not compile"):
        compute.load_functions({"map": ["def m(:\n", "m"]})


def test_jobspec_defaults_and_errors():
    req = {"map_text": "t", "map_name": "m", "reduce_text": "t", "reduce_name": "r"}
    spec = jobspec.parse("mapreduce", req, "zarkov")
    assert (spec.database, spec.input_names, spec.query, spec.output_name, spec.output_type) == \
        ("zarkov", ["event"], {}, "zagg.result", "replace")
    spec = jobspec.parse("mapreduce", {**req, "query": bson.encode({"a": 1})})
    assert spec.query == {"a": 1}
    with pytest.raises(jobspec.BadRequest, match="reduce_text"):
        jobspec.parse("mapreduce", {"map_text": "t", "map_name": "m"})
    with pytest.raises(jobspec.BadRequest, match="query"):
        jobspec.parse("mapreduce", {**req, "query": b"garbage"})
    with pytest.raises(jobspec.BadRequest, match="func_text"):
        jobspec.parse("basic", {})
    assert jobspec.parse("mapreduce", {**req, "inline_max": 4096}).inline_max == 4096
    # A driver may send any integer as a BSON Int64: it is an integer all the same.
    assert jobspec.parse("mapreduce", {**req, "inline_max": bson.Int64(4096)}).inline_max == 4096
    assert jobspec.status_wait({"wait": bson.Int64(5)}) == 5.0
    assert jobspec.parse("mapreduce", {**req, "wait": bson.Int64(1)}).wait is True
    for bad in (-1, "1", 1.5, True, jobspec.INLINE_LIMIT + 1):
        with pytest.raises(jobspec.BadRequest, match="inline_max"):
            jobspec.parse("mapreduce", {**req, "inline_max": bad})
    with pytest.raises(jobspec.BadRequest, match="inline_max.*replace"):
        jobspec.parse("mapreduce", {**req, "inline_max": 10, "output_type": "reduce"})
    assert jobspec.status_wait({}) == 0 and jobspec.status_wait({"wait": 2}) == 2.0
    for bad in (-1, "2", True, float("nan"), jobspec.STATUS_WAIT_LIMIT + 1):
        with pytest.raises(jobspec.BadRequest, match="'wait'"):
            jobspec.status_wait({"wait": bad})


class FakeTasksSocket:
    """The router's tasks socket: records what goes to which connection; a connection
    in ``closed`` refuses, as a ROUTER_MANDATORY socket does."""

    def __init__(self):
        self.sent: list[list[bytes]] = []
        self.closed: set[bytes] = set()

    def send_multipart(self, frames, flags=0):
        if frames[0] in self.closed:
            raise zmq.ZMQError(zmq.EHOSTUNREACH)
        self.sent.append(frames)

    def tasks_to(self, rid: bytes) -> list[bytes]:
        """The task frames sent to ``rid`` (probes left out), in order."""
        return [f[1] for f in self.sent if f[0] == rid and f[1:] != [dispatch.PROBE]]


class Clock:
    """time.monotonic() for the dispatcher, moved by the test."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(dispatch, "time", c)
    return c


class Worker:
    """A worker process as the dispatcher sees it: a connection that asks for tasks,
    answers them, beats and says goodbye."""

    def __init__(self, d: dispatch.Dispatcher, rid: bytes, pid: int, window: int = 2):
        self.d, self.rid, self.pid, self.window = d, rid, pid, window
        self.seen = 0

    def ready(self, free=None, **extra):
        return {"pid": self.pid, "host": "h", "seen": self.seen,
                "free": self.window if free is None else free, **extra}

    def ask(self, free=None):
        self.d.on_worker([self.rid, bson.encode({"ready": self.ready(free)})])

    def got(self) -> list[bytes]:
        return self.d.sock.tasks_to(self.rid)

    def answer(self, task: bytes, ok=True, free=None, **extra):
        """Answer the task whose frame is ``task`` (having received all sent before)."""
        self.seen = self.got().index(task) + 1
        j, t = task.decode().split(":")
        self.d.on_worker([self.rid, bson.encode({"j": j, "t": int(t), "ok": ok, "pid": self.pid,
                                                 "ready": self.ready(free), **extra})])

    def beat(self):
        self.d.on_sink([bson.encode({"hb": self.pid, "host": "h"})])

    def bye(self):
        self.d.on_worker([self.rid, bson.encode({"bye": self.pid, "host": "h"})])


def taskset(d, job="job", cap=60, limit=10, results=None):
    return dispatch.TaskSet(d, job, "map", lambda t, h, f: (results if results is not None
                                                            else []).append(t),
                            lambda: limit, cap=cap)


def add(ts, *ids):
    for i in ids:
        ts.add(i, [f"{ts.job_id}:{i}".encode()], 100)


def frame(ts, i) -> bytes:
    return f"{ts.job_id}:{i}".encode()


def two_workers(*ids, **taskset_args):
    """A dispatcher, a set holding tasks ``ids`` and two worker processes, A and B,
    that have not asked for any yet."""
    d = dispatch.Dispatcher(FakeTasksSocket())
    ts = taskset(d, **taskset_args)
    add(ts, *ids)
    return d, ts, Worker(d, b"A", 101), Worker(d, b"B", 102)


def test_tasks_go_only_to_worker_processes_that_asked_the_idlest_first(clock):
    d = dispatch.Dispatcher(FakeTasksSocket())
    results = []
    ts = taskset(d, results=results)
    add(ts, 1, 2, 3)
    assert d.sock.sent == [] and d.waiting() == 3  # nobody asked yet
    a, b, idle = Worker(d, b"A", 101), Worker(d, b"B", 102, window=1), Worker(d, b"I", 103)
    idle.ask(free=0)
    a.ask()
    assert a.got() == [frame(ts, 1), frame(ts, 2)] and d.waiting() == 1
    b.ask()
    assert b.got() == [frame(ts, 3)] and idle.got() == [] and d.waiting() == 0
    add(ts, 4)
    assert d.waiting() == 1  # A's two places are taken until it says otherwise
    a.answer(frame(ts, 1))  # it has received 1 of 2: room for one more
    assert a.got()[-1] == frame(ts, 4) and results == [1]
    b.answer(frame(ts, 3))
    a.ask()  # said again while idle: changes nothing
    add(ts, 5)
    assert b.got()[-1] == frame(ts, 5)  # B holds nothing, A two: B first
    assert len(a.got()) == 3 and idle.got() == [] and d.dropped == 0


def test_a_goodbye_sends_at_once_what_the_process_held_and_costs_no_attempt(clock):
    d, ts, a, b = two_workers(1, 2)
    a.ask()
    a.answer(frame(ts, 1), free=0)  # its last: it asks for nothing more ...
    a.bye()  # ... but leaves early (its memory) with task 2 unstarted
    assert ts.resent_lost == 1 and ts.resent_for_time_limit == 0 and d.waiting() == 1
    assert ts.pending[2].strikes == 0
    b.ask()
    assert b.got() == [frame(ts, 2)]
    for k in range(dispatch.MAX_ATTEMPTS + 2):  # recycling never fails a task
        w = Worker(d, f"C{k}".encode(), 200 + k)
        b.bye() if k == 0 else None
        w.ask()
        w.bye()
    assert ts.error is None and 2 in ts.pending
    assert d.resent_lost == ts.resent_lost


def test_a_vanished_process_s_tasks_go_out_again_within_a_tick(clock):
    d, ts, a, b = two_workers(1, 2)
    a.ask()
    b.ask(free=0)
    d.sock.closed.add(b"A")  # SIGKILLed: its connection closes
    a.answer(frame(ts, 1))  # a reply it sent before dying is still read
    d.tick()
    assert d.conns[b"A"].gone and ts.resent == 0  # its replies are read first ...
    clock.now += dispatch.GONE_GRACE
    d.tick()
    assert ts.resent_lost == 1 and b"A" not in d.conns  # ... then its tasks go out again
    assert ts.pending[2].strikes == 1  # it was running task 2 (task 1 answered)
    b.ask()
    assert b.got() == [frame(ts, 2)]
    # A send to a connection already closed fails and goes elsewhere.
    add(ts, 3)
    c = Worker(d, b"C", 103)
    d.sock.closed.add(b"C")
    c.ask()
    assert c.got() == [] and b.got()[-1] == frame(ts, 3)


def test_a_silent_process_s_tasks_go_out_again(clock):
    d, ts, a, b = two_workers(1)
    a.ask()
    for _ in range(3):  # its heartbeats come while it runs the task
        clock.now += 1.0
        a.beat()
        d.tick()
    clock.now += dispatch.WORKER_SEEN - 0.1
    d.tick()
    assert ts.resent == 0
    clock.now += 0.2  # no heartbeat for longer than WORKER_SEEN: its host was cut off
    d.tick()
    assert ts.resent_lost == 1 and ts.resent_for_time_limit == 0
    assert ts.pending[1].strikes == 0  # it may be alive, holding the GIL: no attempt
    b.ask()
    assert b.got() == [frame(ts, 1)]


def test_a_busy_live_process_keeps_its_time_limit_counted_from_when_it_began(clock):
    d, ts, a, b = two_workers(1, 2, 3, cap=20)
    a.ask()  # holds 1 (running) and 2 (next)
    assert ts.time_limit(ts.pending[1]) == 20  # nothing observed yet: the cap
    while clock.now < 1000 + 19.5:
        clock.now += 0.5
        a.beat()
        d.tick()
    assert ts.resent == 0  # slow, but alive and within its limit
    a.answer(frame(ts, 1), free=0)  # 20 s; task 2 begins now
    assert ts.pending[2].started == clock.now
    limit = ts.time_limit(ts.pending[2])
    assert limit == 20  # min(cap, FLOOR + FACTOR x 20 s)
    began = clock.now
    while clock.now < began + limit - 0.5:
        clock.now += 0.5
        a.beat()
        d.tick()
    assert ts.resent == 0
    clock.now += 1.0
    a.beat()
    d.tick()  # past its limit on a live process: sent again, counted apart
    assert ts.resent_for_time_limit == 1 and ts.resent_lost == 0
    assert ts.pending[2].strikes == 1
    b.ask()
    assert b.got() == [frame(ts, 2), frame(ts, 3)]
    b.answer(frame(ts, 2))
    a.answer(frame(ts, 2))  # the first send answers late: dropped, counted
    assert ts.duplicates == 1 and 2 in ts.done


def test_a_task_its_processes_keep_dying_on_fails_the_job(clock):
    d = dispatch.Dispatcher(FakeTasksSocket())
    ts = taskset(d, job="doomed")
    add(ts, 1)
    for k in range(dispatch.MAX_ATTEMPTS):
        w = Worker(d, f"W{k}".encode(), 300 + k)
        w.ask()
        assert w.got() == [frame(ts, 1)]
        d.sock.closed.add(w.rid)
        d.tick()
        clock.now += dispatch.GONE_GRACE
        d.tick()
    with pytest.raises(dispatch.TaskFailed, match="not answered after 5 attempts"):
        ts.wait()


def test_late_duplicates_and_strangers_messages_are_counted_and_dropped(clock):
    d = dispatch.Dispatcher(FakeTasksSocket())
    results = []
    ts = taskset(d, results=results)
    add(ts, 1)
    a = Worker(d, b"A", 101)
    a.ask()
    a.answer(frame(ts, 1))
    a.answer(frame(ts, 1))
    assert results == [1] and ts.duplicates == 1
    ts.close()
    ts.wait()
    a.answer(frame(ts, 1))  # nobody listens any more
    assert d.unrouted == 1
    bad = [[b"X"], [b"X", b"not BSON"], [b"X", bson.encode({"what": 1})],
           [b"X", bson.encode({"bye": "x"})], [b"X", bson.encode({"ready": 5})],
           [b"X", bson.encode({"ready": {"pid": 1, "host": "h", "seen": -1, "free": 1}})],
           [b"X", bson.encode({"ready": {"pid": 1, "host": "h", "seen": 0, "free": 10**6}})],
           [b"X", bson.encode({"j": 5, "t": "1"})],
           [b"A", bson.encode({"ready": {**a.ready(), "pid": 999}})]]  # another pid
    for frames in bad:
        d.on_worker(frames)
    d.on_sink([b"\x00garbage"])
    d.on_sink([bson.encode({"j": "job", "t": 1, "ok": True})])  # replies go on tasks
    assert d.dropped == len(bad) + 2 and b"X" not in d.conns


def test_taskset_failure_carries_the_traceback_and_limits_in_flight(clock):
    d = dispatch.Dispatcher(FakeTasksSocket())
    ts = taskset(d, job="job2", limit=1)
    a = Worker(d, b"A", 101)
    a.ask()
    add(ts, 1)
    adder = gevent.spawn(add, ts, 2)
    gevent.sleep(0.05)
    assert a.got() == [frame(ts, 1)]  # the second waits for a free slot
    a.answer(frame(ts, 1), ok=False, traceback="Traceback...\nValueError: boom\n")
    with pytest.raises(dispatch.TaskFailed) as e:
        ts.wait()
    assert "boom" in e.value.traceback
    with pytest.raises(dispatch.TaskFailed):
        adder.get(timeout=5)


def test_spill_files_round_trip_and_removal(tmp_path):
    sp = Spill(str(tmp_path), "j1")
    docs = docs_bytes(2500)
    sp.append("out-000", b"".join(docs[:1000]))
    sp.append("out-000", b"".join(docs[1000:]))
    batches = list(sp.iter_batches("out-000", 1000))
    assert [len(b) for b in batches] == [1000, 1000, 500]
    assert [d for b in batches for d in b] == docs
    sp.remove()
    assert not os.path.exists(os.path.join(str(tmp_path), "j1"))
