"""Positions in one process: their encoding, a journal directory's stream, and the
storage seam's reads by position on the server under test."""
from __future__ import annotations

import os

import bson
import pytest
from bson import ObjectId
from pymongo import MongoClient, monitoring

from tests import aggtools as A
from zarkov import positions, storage, streams
from zarkov.eventlog.stream import JournalBusy, Stream
from zarkov.positions import Range


def test_a_range_is_an_id_range_and_back():
    s = positions.new_stream()
    r = Range(positions.key(s), 10, 13)
    assert len(r) == 3 and len(Range(r.stream, 5, 5)) == 0
    assert [o.binary for o in r.ids()] == [s + n.to_bytes(4, "big") for n in (11, 12, 13)]
    assert r.clause() == {"_id": {"$gt": positions.oid(s, 10), "$lte": positions.oid(s, 13)}}
    assert positions.parse_clause(r.clause()) == r
    assert Range.from_doc(r.as_doc()) == r
    other = positions.new_stream()
    for not_a_range in ({"_id": {"$gt": positions.oid(s, 1), "$lte": positions.oid(other, 2)}},
                        {"_id": {"$gte": positions.oid(s, 1), "$lte": positions.oid(s, 2)}},
                        {"_id": {"$gt": 1, "$lte": 2}}, {"jobs": "x"},
                        {"_id": {"$gt": positions.oid(s, 1), "$lte": positions.oid(s, 2)},
                         "type": "t"}):
        assert positions.parse_clause(not_a_range) is None


def test_a_record_tells_its_position_by_its_first_bytes():
    s = positions.new_stream()
    logged = bson.encode({"_id": positions.oid(s, 7), "_seq": positions.seq_value(7),
                          "type": "t"})
    assert positions.of_record(logged) == (s, 7)
    for other in ({"_id": ObjectId(), "type": "t"}, {"type": "t", "_id": positions.oid(s, 7)},
                  {"_id": positions.oid(s, 7), "_seq": 7, "type": "t"}):  # an int32 _seq
        assert positions.of_record(bson.encode(other)) is None


def test_a_stream_goes_on_after_a_clean_stop_and_begins_anew_after_a_crash(tmp_path):
    d = str(tmp_path / "server-0")
    first = Stream(d).open()
    assert [first.take()[1] for _ in range(3)] == [1, 2, 3]
    with pytest.raises(JournalBusy, match="server-0 is in use by another process"):
        Stream(d).open()
    first.close()  # a clean stop: the next start goes on with the same stream
    second = Stream(d).open()
    assert second.stream == first.stream and second.take() == (
        positions.id_bytes(first.stream, 4), 4)
    os.close(second._lock)  # what a SIGKILL does: the lock goes, no state is written
    second._lock = None
    third = Stream(d).open()
    assert third.stream != first.stream and third.take()[1] == 1
    third.close()


class Commands(monitoring.CommandListener):
    """The filters of the find commands one client sends to the event collections."""

    def __init__(self):
        self.finds: list[dict] = []
        self.sorts: list[dict] = []

    def started(self, event):
        if event.command_name == "find" and str(event.command["find"]).startswith("event"):
            self.finds.append(dict(event.command.get("filter") or {}))
            self.sorts.append(dict(event.command.get("sort") or {}))

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


@pytest.fixture
def watched(mongo_uri, db):
    """The test database through a client whose find commands are recorded."""
    listener = Commands()
    client = MongoClient(mongo_uri, event_listeners=[listener])
    yield client[db.name], listener
    client.close()


def _ids(arrays) -> list:
    return [d["_id"] for a in arrays for d in bson.decode(a).values()]


def test_reads_by_position_take_exactly_the_range_the_way_the_server_serves_it(
        db, watched, server):
    wdb, listener = watched
    A.add_events(db, 3000, kind="logged")
    stream = A.logger_stream(db)
    # Older events were rotated away: the read looks for them in event.0 too.
    moved = list(db.event.find({"_seq": {"$lte": 20}}))
    db["event.0"].insert_many(moved)
    db.event.delete_many({"_id": {"$in": [d["_id"] for d in moved]}})
    db.event.delete_one({"_seq": 2990})  # a position whose event the database refused
    key = positions.key(stream.stream)
    ranges = [Range(key, 15, 25), Range(key, 2985, 2995)]
    query = {"$or": [r.clause() for r in ranges] + [{"jobs": "run-1"}]}
    db.event.insert_one({"foo": "x", "jobs": ["run-1"]})  # a marked event, no position

    got = _ids(storage.reads(wdb).arrays(["event", "event.0"], query))

    want = ([positions.oid(stream.stream, n) for n in list(range(16, 26)) + list(range(2986, 2996))
             if n != 2990])
    assert sorted(got[:-1]) == sorted(want) and len(got) == len(want) + 1
    kinds = {server.caps.id_reads}
    if kinds == {storage.ID_RANGE}:  # the filter as it is: index scans
        assert listener.finds == [query, query]
    elif kinds == {storage.ID_IN}:  # the newest, $in lists, then the marked by their filter
        assert listener.finds[0] == {} and listener.sorts[0] == {"$natural": -1}
        assert all(list(f) == ["_id"] and "$in" in f["_id"] for f in listener.finds[1:-2])
        assert listener.finds[-2:] == [{"jobs": "run-1"}] * 2
    else:  # one id at a time
        ones = listener.finds[:-2]
        assert all(list(f) == ["_id"] and isinstance(f["_id"], ObjectId) for f in ones)
        # 20 ids in event, then the 5 found neither there nor... in event.0 (and 2990).
        assert len(ones) == 20 + 6


def test_a_range_among_the_newest_events_is_read_from_the_end_where_that_is_cheap(
        db, watched, server):
    """mongo-java-server: a run that keeps up finds its range at the end of natural order
    and needs no ``$in`` list; an older range costs one short read more; an event
    stored in a slot freed by a deletion (the memory backend reuses them) is still
    found.  Elsewhere no such read is made."""
    wdb, listener = watched
    A.add_events(db, 3000, kind="logged")
    stream = A.logger_stream(db).stream
    key = positions.key(stream)

    def read(after: int, upto: int) -> list:
        listener.finds.clear()
        listener.sorts.clear()
        got = _ids(storage.reads(wdb).arrays(["event"], Range(key, after, upto).clause()))
        assert sorted(got) == [positions.oid(stream, n) for n in range(after + 1, upto + 1)]
        return listener.finds

    tail = server.caps.natural_slices
    newest = read(2940, 3000)
    if tail:
        assert newest == [{}] and listener.sorts == [{"$natural": -1}]  # no $in list
    older = read(1000, 1050)
    if tail:
        assert older[0] == {} and len(older) == 2 and "$in" in older[1]["_id"]
    else:
        assert {"$natural": -1} not in listener.sorts
    db.event.delete_many({"_seq": {"$lte": 300}})
    A.add_events(db, 100, kind="logged")  # into the freed slots, or at the end
    read(3000, 3100)
    if tail:
        assert read(2940, 3000) == []  # the cache has them


def test_reads_by_position_with_a_task_filter_ask_the_server(db, watched, server):
    """A Task's own filter is checked by the server: read as one query."""
    wdb, listener = watched
    A.add_events(db, 200, keys="ab", kind="logged", seed=1)
    key = positions.key(A.logger_stream(db).stream)
    query = {"$and": [Range(key, 0, 200).clause(), {"foo": "a"}]}
    got = _ids(storage.reads(wdb).arrays(["event"], query))
    assert sorted(got) == sorted(d["_id"] for d in db.event.find({"foo": "a"}))
    assert listener.finds == [query]


def test_a_large_range_is_read_as_one_query_where_ids_would_cost_more(db, watched, server):
    wdb, listener = watched
    A.add_events(db, 500, kind="logged")
    key = positions.key(A.logger_stream(db).stream)
    got = _ids(storage.reads(wdb).arrays(["event"], Range(key, 0, 500).clause()))
    assert len(got) == 500 and len(listener.finds) == 1


def test_stream_bounds_only_grow(db):
    s = positions.new_stream()
    streams.publish(db, "event", {s: 10}, "j")
    streams.publish(db, "event", {s: 7}, "j")  # a late publisher: $max keeps 10
    assert streams.bounds(db, "event") == {positions.key(s): 10}
    assert streams.bounds(db, "other") == {}
