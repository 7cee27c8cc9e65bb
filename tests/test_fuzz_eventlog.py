"""Fuzzing the event logger: its schema in-process, then its sockets in a real process.

The socket tests share one ``zcmd eventlog`` with two event servers (the default of
a two-core machine), send it whatever the strategies make, and end with
:meth:`FuzzedLogger.check`: every message accepted or rejected, every accepted event
stored or refused by the database, well-formed events sent last all stored, no
unexpected exception in any loop.
"""
from __future__ import annotations

import os
import uuid

import bson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.conftest import make_config
from tests.eventlog_fuzz import FuzzedLogger
from tests.eventlog_util import stats
from tests.strategies import (
    bson_events,
    bson_messages,
    deep_bson,
    deep_json,
    fuzz_settings,
    json_messages,
    multipart,
)
from tests.support import wait_for, write_config
from zarkov.eventlog.schema import (
    MAX_BSON_SIZE,
    MAX_DEPTH,
    Rejected,
    decode_many,
    prepare_bson,
    prepare_json,
)
from zarkov.eventlog.stream import Stream

pytestmark = pytest.mark.fuzz


def _depth(value, level=1) -> int:
    if isinstance(value, dict):
        return max([level] + [_depth(v, level + 1) for v in value.values()])
    if isinstance(value, list):
        return max([level] + [_depth(v, level + 1) for v in value])
    return level - 1


def _valid_output(data: bytes) -> None:
    assert len(data) <= MAX_BSON_SIZE
    doc = bson.decode(data)
    assert isinstance(doc.get("_id"), object) and "_id" in doc
    assert _depth(doc) <= MAX_DEPTH


# -- the schema, in-process: only Rejected, never another exception ----------------------

def _prepared_or_rejected(prepare, msg: bytes) -> None:
    try:
        out = prepare(msg, 0)
    except Rejected as e:
        assert str(e) and "\n" not in str(e) and len(str(e)) < 300
        return
    _valid_output(out)


@fuzz_settings(400)
@given(st.one_of(json_messages(), st.binary()))
def test_prepare_json_returns_a_storable_event_or_rejects(msg):
    _prepared_or_rejected(prepare_json, msg)


@fuzz_settings(400)
@given(st.one_of(bson_messages(), bson_events(nan=True).map(bson.encode)))
def test_prepare_bson_returns_a_storable_event_or_rejects(msg):
    _prepared_or_rejected(prepare_bson, msg)


def _outcome(prepare, *args) -> object:
    try:
        return prepare(*args)
    except Rejected as e:
        return f"rejected: {e}"


_GOOD = bson.encode({"type": "view", "extra": 1})


@fuzz_settings(100)
@given(st.lists(st.one_of(bson_messages(), bson_events(nan=True).map(bson.encode)),
                max_size=6))
@example([_GOOD, _GOOD + b"\x00", _GOOD])       # one message longer than it says
@example([_GOOD, _GOOD[:-1], _GOOD])             # one shorter
@example([_GOOD, bson.encode({"type": "x", "$command": "event_noval"})])
def test_a_batch_decoded_at_once_prepares_every_message_as_if_alone(msgs):
    # The event server decodes a batch in one call (decode_many): each message must
    # come out the same (same bytes, same position, or the same reason to reject it).
    alone, batch = Stream.detached(), Stream("")
    batch.stream = alone.stream
    decoded = decode_many(msgs)
    assert decoded is None or len(decoded) == len(msgs)
    for i, msg in enumerate(msgs):
        expected = _outcome(prepare_bson, msg, 0, alone)
        doc = None if decoded is None else decoded[i]
        assert _outcome(prepare_bson, msg, 0, batch, doc) == expected


@pytest.mark.parametrize("depth, ok", [(MAX_DEPTH - 2, True), (MAX_DEPTH - 1, False),
                                       (5000, False), (100000, False)])
def test_depth_limit_is_the_same_for_bson_and_json(depth, ok):
    # context is level 2 of the event, so `depth` nested levels in it make depth + 2.
    for make in (lambda: prepare_bson(deep_bson(depth), 0),
                 lambda: prepare_json(deep_json(depth), 0),
                 lambda: prepare_json(deep_json(depth, "{", "}"), 0)):
        if ok:
            _valid_output(make())
        else:
            with pytest.raises(Rejected, match="nested more than 100 levels deep"):
                make()


# -- the sockets of a real event logger ----------------------------------------------------

@pytest.fixture(scope="module")
def fuzzed(module_procs, mongo_uri, mongo_client, tmp_path_factory):
    """One ``zcmd eventlog`` with two event servers for the module's fuzz tests."""
    tmp = str(tmp_path_factory.mktemp("fuzz-eventlog"))
    name = "zt_fuzzlog_" + uuid.uuid4().hex[:8]
    cfg = {**make_config(tmp, mongo_uri, name), "num_event_servers": 2}
    path = write_config(os.path.join(tmp, "zarkov.yaml"), cfg)
    proc = module_procs.zcmd("fuzz-eventlog", path, "eventlog")
    wait_for(lambda: all(stats(cfg["journal"], i).get("pid") for i in (0, 1)), timeout=30,
             what="two event servers")
    logger = FuzzedLogger(proc, cfg, 2)
    logger.coll = mongo_client[name].event
    yield logger
    logger.close()
    mongo_client.drop_database(name)


@pytest.mark.parametrize("source, messages", [("bson", bson_messages),
                                             ("json", json_messages)])
def test_fuzz_event_socket(fuzzed, source, messages):
    @fuzz_settings(80)
    @given(st.lists(multipart(messages()), min_size=1, max_size=6))
    def send(batch):
        for frames in batch:
            fuzzed.send(source, frames)
        assert fuzzed.alive()
    send()
    fuzzed.check(fuzzed.coll)


def test_fuzz_raw_tcp_and_wrong_socket(fuzzed):
    """Bytes that are not ZeroMQ at all, and each kind of message on the other socket."""
    @fuzz_settings(20)
    @given(st.sampled_from(["bson", "json"]), st.binary(max_size=300),
           bson_messages(), json_messages())
    def send(source, garbage, b, j):
        fuzzed.raw_tcp(source, garbage)
        fuzzed.send("json", [b])
        fuzzed.send("bson", [j])
        assert fuzzed.alive()
    send()
    fuzzed.check(fuzzed.coll)


def test_huge_messages_at_the_limits(fuzzed):
    """16 MB is the limit on both sockets; an event just under it is stored (or refused
    by the database, if it counts differently), one over it is rejected."""
    from zarkov.eventlog.schema import MAX_EVENT_SIZE
    before = fuzzed.ledger()["rejects"]

    def sized(size: int, tag: str) -> bytes:
        pad = size - len(bson.encode({"type": tag, "extra": ""}))
        data = bson.encode({"type": tag, "extra": "x" * pad})
        assert len(data) == size
        return data

    fuzzed.send("bson", [sized(MAX_EVENT_SIZE, "just-under")])
    fuzzed.send("bson", [sized(MAX_EVENT_SIZE + 1, "just-over")])
    fuzzed.send("json", [b'{"type": "j", "extra": "' + b"y" * (MAX_EVENT_SIZE + 10) + b'"}'])
    # Under the limit as JSON, but 2 bytes of JSON per zero become ~8 bytes of BSON.
    fuzzed.send("json", [b'{"type": "expands", "extra": [' + b"0," * (4 << 20) + b'0]}'])
    led = fuzzed.check(fuzzed.coll)
    added = led["rejects"] - before
    assert added["bson"] == 1 and added["json"] == 2, added
    stored = fuzzed.coll.count_documents({"type": "just-under"})
    assert stored + added["database"] == 1
