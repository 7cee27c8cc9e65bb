"""The event logger's parts in-process: schema, journal files, rotate, and perftest through zcmd."""
from __future__ import annotations

import datetime as dt
import os
import time

import bson
import pytest

from tests.eventlog_util import load, start_logger
from tests.support import run_zcmd, wait_for
from zarkov import positions
from zarkov.eventlog import journal as J
from zarkov.eventlog.rotate import rotate
from zarkov.eventlog.schema import Rejected, prepare_bson, prepare_json
from zarkov.eventlog.stream import Stream


def test_bson_event_is_stored_as_received_with_missing_fields_in_front():
    sent = bson.encode({"type": "t", "extra": {"a": [1, {"b": 2}]}})
    ids = Stream.detached()
    raw = prepare_bson(sent, 1300000000123, ids)
    doc = bson.decode(raw)
    assert list(doc) == ["_id", "_seq", "timestamp", "context", "type", "extra"]
    # Its position: the stream's first, in its _id and _seq.
    assert doc["_id"].binary == ids.stream + b"\x00\x00\x00\x01" and doc["_seq"] == 1
    assert positions.of_record(raw) == (ids.stream, 1)
    assert positions.of_record(prepare_json(b'{"type": "t"}', 0, ids)) == (ids.stream, 2)
    assert doc["timestamp"] == dt.datetime(2011, 3, 13, 7, 6, 40, 123000)
    assert doc["context"] == {} and doc["extra"] == {"a": [1, {"b": 2}]}
    complete = bson.encode({"_id": 1, "timestamp": dt.datetime(2020, 1, 1), "type": "t",
                            "context": {}})
    assert prepare_bson(complete, 0) is complete  # nothing to add: the very bytes


def test_json_datetimes_and_rejects():
    doc = bson.decode(prepare_json(b'{"type": "t", "extra": {"when": [{"$datetime": 0}]}}', 0))
    assert doc["extra"]["when"][0] == dt.datetime(1970, 1, 1)
    for bad in (b'{"type": "t", "x": {"$datetime": 1, "y": 2}}', b'"text"', b'{"type": 1e999}',
                b'{"type": "t", "extra": 123456789012345678901234567890}', b"\xff\xfe"):
        with pytest.raises(Rejected):
            prepare_json(bad, 0)


def test_journal_reads_back_and_stops_at_a_torn_tail(tmp_path):
    j = J.Journal(str(tmp_path / "j"), file_size=300)
    j.open()
    docs = [bson.encode({"i": i, "pad": "x" * 50}) for i in range(10)]
    for d in docs:
        j.append([d])
    j.close()
    files = J.list_files(str(tmp_path / "j"))
    assert len(files) == len(j.closed) >= 3  # rotated when full
    back = [d for f in files for d in J.read_records(f)[0]]
    assert back == docs
    before, end, problem = J.read_records(files[-1])
    assert before and problem is None
    with open(files[-1], "ab") as f:  # a crash in the middle of a write
        f.write(J.frame(docs[0])[:20])
    got, stop, problem = J.read_records(files[-1])
    assert got == before and stop == end and "torn record" in problem
    j2 = J.Journal(str(tmp_path / "j"), file_size=300)
    j2.open()  # a new run starts a new file after the old ones
    assert j2.path not in files and os.path.basename(j2.path) > os.path.basename(files[-1])
    j2.close()


def test_the_journal_hands_the_committer_what_it_wrote_as_read_back_from_any_record(
        tmp_path, monkeypatch):
    # What the committer takes from memory must be what it would read from the files:
    # from every record boundary (a commit may stop inside an append), to the end of a
    # closed file or to where the open file ends.
    j = J.Journal(str(tmp_path / "j"), file_size=500)
    j.open()
    sent = [bson.encode({"i": i, "pad": "x" * (i % 7) * 9}) for i in range(40)]
    at = 0
    for size in (1, 3, 2, 5, 1, 4, 6, 2, 3, 1, 2, 4, 6):
        batch = sent[at:at + size]
        at += size
        j.append(batch)
    assert at == len(sent) and len(j.closed) >= 3
    files = [*j.closed, j.path]
    for path in files:
        records = J.read_records(path)[0]
        bounds = [len(J.MAGIC)]
        for d in records:
            bounds.append(bounds[-1] + J.HEADER.size + len(d))
        end = None if path in j.closed else j.size
        for k, start in enumerate(bounds):
            assert j.recorded(path, start, end) == records[k:], (path, start)
        assert j.recorded(path, 0, end) == records
        assert j.recorded(path, bounds[1] + 1, end) is None  # not a record's start
    first = j.closed[0]
    j.forget(first, len(J.MAGIC) + J.HEADER.size + len(sent[0]))  # the first append
    assert j.recorded(first, 0) is None  # no longer all kept: read the file
    assert j.recorded(first, len(J.MAGIC) + J.HEADER.size + len(sent[0])) == \
        J.read_records(first)[0][1:]
    j.forget(first)
    assert j.recorded(first, 0) is None
    monkeypatch.setattr(J, "KEPT_BYTES", 0)
    j.append([sent[0]])  # not kept: the open file then reads from disk
    assert j.recorded(j.path, len(J.MAGIC), j.size) is None
    j.close()


def test_rotate_keeps_num_event_logs_and_dumps_the_oldest(db, tmp_path, expect_path):
    for name, n in (("event", 3), ("event.0", 2), ("event.1", 1)):
        db[name].insert_many([{"type": name, "i": i} for i in range(n)])
    db.event.create_index("type", name="by_type")
    dump = str(tmp_path / "dump")
    done = rotate(db, dump, keep=2)
    assert any("dumped event.1 (1 documents)" in line for line in done), done
    moved = [line for line in done if "event to event.0" in line]
    expect_path("move", "renamed" if moved[0].startswith("renamed") else "moved documents")
    names = set(db.list_collection_names())
    assert {"event.0", "event.1"} <= names and "event.2" not in names
    assert db["event.0"].count_documents({"type": "event"}) == 3
    assert db["event.1"].count_documents({"type": "event.0"}) == 2
    assert "by_type" in db.event.index_information()
    [dumped] = os.listdir(dump)
    with open(os.path.join(dump, dumped), "rb") as f:
        assert [d["type"] for d in bson.decode_all(f.read())] == ["event.1"]
    db.event.insert_one({"type": "new"})
    done = rotate(db, dump, keep=2)  # again: event.1 (the old event.0) is dumped and dropped
    assert any("dumped event.1 (2 documents)" in line for line in done), done
    assert [d["type"] for d in db["event.0"].find()] == ["new"]
    assert db["event.1"].count_documents({"type": "event"}) == 3
    assert len(os.listdir(dump)) == 2


def test_perftest_and_rotate_through_zcmd(procs, config_file, db, tmp_path):
    path = config_file()
    cfg = load(path)
    start_logger(procs, path)
    out = run_zcmd(path, "perftest", cfg["bson_uri"], "1500", "3", "1000", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "second 1: sent" in out.stdout and "perftest: sent 1500 events" in out.stdout
    wait_for(lambda: db.event.count_documents({}) == 1500, what="the perftest events stored")
    assert sorted(d["extra"]["seq"]
                  for d in db.event.find({}, {"extra.seq": 1})) == list(range(1500))
    out = run_zcmd(path, "rotate", str(tmp_path / "dump"), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "event to event.0" in out.stdout
    assert db["event.0"].count_documents({}) == 1500


def test_an_insert_in_parts_reports_each_refusal_at_its_place_in_the_batch(db):
    from pymongo.errors import BulkWriteError

    from zarkov.eventlog.committer import DUPLICATE_CODES, PARALLEL_MIN, insert_unordered
    n = PARALLEL_MIN + 500  # in parts, the second part's refusal past the first's size
    docs = [bson.encode({"_id": i, "n": i}) for i in range(n)]
    db.event.insert_many([{"_id": 10, "n": -1}, {"_id": n - 3, "n": -1}])
    with pytest.raises(BulkWriteError) as e:
        insert_unordered(db.event, docs)
    errors = e.value.details["writeErrors"]
    assert sorted(x["index"] for x in errors) == [10, n - 3]
    assert {x["code"] for x in errors} <= DUPLICATE_CODES
    assert db.event.count_documents({}) == n
    assert db.event.count_documents({"n": -1}) == 2  # the first ones stay
    insert_unordered(db.event.database.other, docs)  # no error: nothing raised
    assert db.other.count_documents({}) == n


def test_messages_a_socket_loop_holds_while_gathering_more_are_stored_at_stop(
        zconfig, db, monkeypatch):
    """A small batch waits a moment for more messages (the event server's GATHER); a
    stop in that moment journals and stores it like everything still queued."""
    import gevent
    import zmq

    from zarkov import config as C
    from zarkov.eventlog import server as S

    monkeypatch.setattr(S, "GATHER", 60.0)
    srv = S.EventServer(C.from_dict(zconfig)).start()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    try:
        push.connect(zconfig["bson_uri"])
        push.send(bson.encode({"type": "held"}))
        deadline = time.monotonic() + 10
        while not srv._held.get("bson") and time.monotonic() < deadline:
            gevent.sleep(0.01)  # the server's loops run while this one sleeps
        assert srv._held.get("bson"), "the bson loop never held the message"
        push.send(bson.encode({"type": "queued"}))
        gevent.sleep(0.05)  # reaches the server's queue; its loop still waits
    finally:
        push.close(0)
        ctx.term()
        assert srv.stop(10)
    assert sorted(d["type"] for d in db.event.find()) == ["held", "queued"]
