"""One bad message must cost that message only: the cases of issue 11, through real
event loggers with the default two event servers, and a database hiccup."""
from __future__ import annotations

import json
import os

import pymongo
import pytest
from pymongo.uri_parser import parse_uri

from tests.eventlog_fuzz import rejects_by_source
from tests.eventlog_util import load, push, seqs, start_logger, stats
from tests.support import wait_for
from tests.tcpproxy import TcpProxy


def start_two_servers(procs, path: str):
    """``zcmd eventlog`` with num_event_servers: 2; returns (process, journal, pids)."""
    journal = load(path)["journal"]
    p = procs.zcmd("eventlog", path, "eventlog")
    pids = wait_for(lambda: all(stats(journal, i).get("pid") for i in (0, 1))
                    and [stats(journal, i)["pid"] for i in (0, 1)], timeout=30,
                    what="two event servers")
    return p, journal, pids


def summed(journal: str, key: str) -> int:
    return sum(stats(journal, i).get(key, 0) for i in (0, 1))


def rejects(journal: str) -> list[dict]:
    try:
        with open(f"{journal}/rejects.jsonl") as f:
            return [json.loads(line) for line in f]
    except FileNotFoundError:
        return []


def test_deep_json_costs_one_reject_and_the_100_events_after_it_are_stored(
        procs, config_file, db):
    path = config_file(num_event_servers=2)
    p, journal, pids = start_two_servers(procs, path)
    deep = b'{"type": "deep", "context": {"x": ' + b"[" * 100000 + b"]" * 100000 + b"}}"
    good = [json.dumps({"type": "ok", "extra": {"seq": i}}).encode() for i in range(100)]
    push(load(path)["json_bind_address"], [deep] + good)
    wait_for(lambda: db.event.count_documents({}) >= 100, timeout=60,
             what="the 100 events sent after the deep one")
    assert seqs(db.event) == list(range(100))
    wait_for(lambda: summed(journal, "rejected") == 1, what="one reject counted")
    [reject] = rejects(journal)
    assert reject["source"] == "json" and reject["reason"] == "nested more than 100 levels deep"
    assert summed(journal, "errors") == 0
    assert [stats(journal, i)["pid"] for i in (0, 1)] == pids and p.poll() is None
    assert "nested more than 100 levels deep" in procs.log("eventlog")
    assert "RecursionError" not in procs.log("eventlog")


def _refuses_nan(db) -> bool:
    """Whether this server refuses a NaN (FerretDB closes the connection; MongoDB
    stores it): decided by what it does, not by its name."""
    try:
        db.nan_probe.insert_one({"x": float("nan")})
        return False
    except pymongo.errors.PyMongoError:
        return True
    finally:
        db.drop_collection("nan_probe")


def test_a_nan_event_does_not_hold_back_the_200_bson_events_after_it(procs, config_file, db):
    refuses = _refuses_nan(db)
    path = config_file(num_event_servers=2)
    p, journal, pids = start_two_servers(procs, path)
    good = [{"type": "ok", "extra": {"seq": i}} for i in range(200)]
    push(load(path)["bson_bind_address"], [{"type": "nanb", "context": {"x": float("nan")}}]
         + good)
    wait_for(lambda: db.event.count_documents({"type": "ok"}) >= 200, timeout=60,
             what="the 200 events sent after the NaN one")
    assert sorted(d["extra"]["seq"] for d in db.event.find({"type": "ok"})) == list(range(200))

    def settled():
        stored = db.event.count_documents({"type": "nanb"})
        refused = rejects_by_source(journal)["database"]
        return stored + refused == 1 and (stored, refused)
    stored, refused = wait_for(settled, timeout=60, what="the NaN event stored or refused")
    if refuses:  # e.g. the bundled FerretDB
        assert refused == 1
        [reject] = rejects(journal)
        assert reject["source"] == "database"
        assert reject["reason"].startswith("refused by the database")
        assert "while the database answered ping" in reject["reason"]
    # Not mistaken for an outage; every event accounted for, no loop hurt.
    log = procs.log("eventlog")
    assert "cannot commit to the database" not in log
    wait_for(lambda: summed(journal, "committed") + refused == 201, what="201 accounted for")
    assert summed(journal, "errors") == 0
    assert [stats(journal, i)["pid"] for i in (0, 1)] == pids and p.poll() is None


@pytest.fixture
def proxy(mongo_uri):
    host, port = parse_uri(mongo_uri)["nodelist"][0]
    p = TcpProxy(host, port).start()
    yield p
    p.close()


def test_a_connection_cut_while_the_database_answers_rejects_nothing(
        procs, config_file, proxy, mongo_client, db_name):
    """A hiccup is not a refusal: a batch, then a lone event, whose insert loses its
    connection once, are stored, and nothing is rejected."""
    path = config_file(mongo_uri=proxy.uri)
    cfg = load(path)
    start_logger(procs, path)
    event = mongo_client[db_name].event
    push(cfg["bson_bind_address"], [{"type": "warm", "extra": {"seq": -1}}])
    wait_for(lambda: event.count_documents({}) == 1, what="the first event stored")

    proxy.drop_next(b"\x02insert\x00")
    push(cfg["bson_bind_address"], [{"type": "batch", "extra": {"seq": i}} for i in range(50)])
    wait_for(lambda: event.count_documents({"type": "batch"}) >= 50, timeout=60,
             what="the 50 events of the cut batch")
    proxy.drop_next(b"\x02insert\x00")
    push(cfg["bson_bind_address"], [{"type": "lone", "extra": {"seq": 50}}])
    wait_for(lambda: event.count_documents({"type": "lone"}) == 1, timeout=60,
             what="the lone event whose insert was cut")

    assert proxy.dropped == 2
    assert seqs(event) == list(range(-1, 51))
    s = stats(cfg["journal"])
    assert s["rejected"] == 0 and s["errors"] == 0 and s["db_ok"]
    assert procs.log("eventlog").count("splitting it to find what the database refuses") == 2


def test_a_control_character_in_a_top_level_field_name_is_rejected(procs, config_file, db):
    """The bundled FerretDB stores such a name unescaped and then fails every scan of
    the collection (found by fuzzing): the event is rejected, the collection stays
    readable."""
    path = config_file()
    cfg = load(path)
    start_logger(procs, path)
    push(cfg["bson_bind_address"], [{"$command": "event_noval", "a\x1bb": 1},
                                    {"$command": "event_noval", "ok": {"nested\x1b": 1}},
                                    {"type": "after"}])
    wait_for(lambda: db.event.count_documents({}) == 2, what="the two other events stored")
    assert db.event.count_documents({"type": "after"}) == 1  # a scan: still readable
    [reject] = rejects(cfg["journal"])
    assert reject["reason"] == "field name 'a\\x1bb' holds a control character"


def test_the_rejects_file_is_rotated_by_size_and_count(procs, config_file, db):
    # A sender gone mad must not fill the journal's disk with rejects.
    path = config_file(num_event_servers=2, rejects_file_size=4000, rejects_files=2)
    p, journal, _ = start_two_servers(procs, path)
    bad = [json.dumps({"type": "bad", "nosuch": i}).encode() for i in range(300)]
    push(load(path)["json_bind_address"], bad + [json.dumps({"type": "ok"}).encode()])
    wait_for(lambda: summed(journal, "rejected") == 300, what="300 rejects counted")
    wait_for(lambda: db.event.count_documents({"type": "ok"}) == 1, what="the good event")
    files = sorted(f for f in os.listdir(journal) if f.startswith("rejects.jsonl"))
    # The current file is missing when the last reject filled it and it was rotated.
    assert files in (["rejects.jsonl", "rejects.jsonl.1", "rejects.jsonl.2"],
                     ["rejects.jsonl.1", "rejects.jsonl.2"]), files
    lines = []
    for name in files:
        size = os.path.getsize(os.path.join(journal, name))
        with open(os.path.join(journal, name)) as f:
            kept = [json.loads(line) for line in f]
        assert size < 4000 + 2 * 400, (name, size)  # rotated once past the limit
        assert all(r["reason"] == "unknown field 'nosuch'" for r in kept)
        lines += kept
    assert 0 < len(lines) < 300  # the oldest were deleted
    assert p.poll() is None
