"""Map-reduce pieces in one process: keys and partitions, chunk cutting, the
worker's computations, request parsing, and the dispatch bookkeeping."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time

import bson
from bson.raw_bson import RawBSONDocument
import gevent
import pytest

from tests.support import ROOT, proc_env
from zarkov.zmr import compute, dispatch, jobspec, reader
from zarkov.bsonkeys import group_key, partition_of
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
    f = fns(reduce=RED, finalize=("f", "(objs)", "return ({'_id': o['_id'], 'n': o['value']} for o in objs)"))
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
    for bad in (-1, "1", 1.5, True, jobspec.INLINE_LIMIT + 1):
        with pytest.raises(jobspec.BadRequest, match="inline_max"):
            jobspec.parse("mapreduce", {**req, "inline_max": bad})
    with pytest.raises(jobspec.BadRequest, match="inline_max.*replace"):
        jobspec.parse("mapreduce", {**req, "inline_max": 10, "output_type": "reduce"})
    assert jobspec.status_wait({}) == 0 and jobspec.status_wait({"wait": 2}) == 2.0
    for bad in (-1, "2", True, float("nan"), jobspec.STATUS_WAIT_LIMIT + 1):
        with pytest.raises(jobspec.BadRequest, match="'wait'"):
            jobspec.status_wait({"wait": bad})


class FakeDispatcher(dispatch.Dispatcher):
    """A dispatcher whose socket only records what was sent."""

    def __init__(self):
        super().__init__(push_socket=None)
        self.sent = []

    def send(self, frames):
        self.sent.append(frames)


def reply(ts, t, ok=True, **extra):
    ts.dispatcher.on_message([bson.encode({"j": ts.job_id, "t": t, "ok": ok, **extra})])


def test_taskset_ignores_late_duplicates_and_resends_after_time_limit():
    d = FakeDispatcher()
    results = []
    ts = dispatch.TaskSet(d, "job1", "map", lambda t, h, f: results.append(t), lambda: 10, cap=60)
    ts.add(1, [b"a"], 100)
    ts.add(2, [b"b"], 100)
    assert ts.time_limit(ts.pending[1]) == 60  # nothing observed yet: the cap
    reply(ts, 1)
    reply(ts, 1)  # a late duplicate
    assert results == [1] and ts.duplicates == 1
    limit = ts.time_limit(ts.pending[2])
    assert dispatch.FLOOR <= limit < 10  # adapted to the fast first answer
    ts.resend_expired(ts.pending[2].sent_at + limit + 0.1)
    assert ts.resent == 1 and len(d.sent) == 3
    ts.close()
    reply(ts, 2)
    ts.wait()
    assert results == [1, 2]
    reply(ts, 2)  # the first send of task 2 answers late: nobody listens any more
    assert d.unrouted == 1


def test_a_worker_saying_goodbye_makes_the_tasks_out_be_sent_again_soon():
    d = FakeDispatcher()
    ts = dispatch.TaskSet(d, "job3", "map", lambda t, h, f: None, lambda: 10, cap=60)
    ts.add(1, [b"a"], 100)
    ts.add(2, [b"b"], 100)
    sent_at = ts.pending[1].sent_at
    ts.resend_expired(sent_at + 1.0)
    assert ts.resent == 0  # within the time limit (the cap: nothing observed yet)
    d.on_message([bson.encode({"bye": 4242, "host": "h"})])  # a recycling worker
    ts.resend_expired(time.monotonic() + dispatch.BYE_GRACE + 0.05)
    assert ts.resent == 2 and len(d.sent) == 4  # may have been queued there: again
    ts.add(3, [b"c"], 100)  # sent after the goodbye: not suspect
    ts.resend_expired(time.monotonic() + dispatch.BYE_GRACE + 0.05)
    assert ts.resent == 2
    d.on_message([bson.encode({"bye": "x"})])
    assert d.dropped == 1


def test_taskset_failure_carries_the_traceback_and_limits_in_flight():
    d = FakeDispatcher()
    ts = dispatch.TaskSet(d, "job2", "reduce", lambda t, h, f: None, lambda: 1, cap=60)
    ts.add(1, [b"a"])
    adder = gevent.spawn(ts.add, 2, [b"b"])
    gevent.sleep(0.05)
    assert len(d.sent) == 1  # the second waits for a free slot
    reply(ts, 1, ok=False, traceback="Traceback...\nValueError: boom\n")
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
