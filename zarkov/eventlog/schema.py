"""The event schema: turn one received message into the BSON document to store.

An event (README) has ``timestamp`` (a datetime, filled with the receive time when
missing), ``type`` (a string, required), ``context`` (a document, ``{}`` when missing)
and ``extra`` (anything).  Its position (:mod:`zarkov.positions`: the ``_id`` and
``_seq`` fields, first in the document) is given here, before the event is
journaled, from the stream of the journal it goes to, so that replaying the journal
after a crash inserts nothing twice: the second insert of the same ``_id`` fails with
a duplicate-key error, which the committer reads as "already stored".  An ``_id``
sent by the client is kept, and the event then has no position (runs count it by
marks); ``_seq`` is the logger's alone and refused in any message.

A message with ``"$command": "event_noval"`` is stored as sent, minus that key (and
plus an ``_id`` when it has none), unless a top-level field name holds a control
character (U+0000 to U+001F).  Any other ``$command`` is rejected, and so is a
top-level key the schema does not know.

For BSON messages the received bytes are stored as they are: the fields that must
be added (``_id``, ``timestamp``, ``context``) are spliced in front of the received
elements, so a valid event is decoded once (to validate it) and never re-encoded.

Whatever the bytes, :func:`prepare_bson` and :func:`prepare_json` either return the
document to store or raise :class:`Rejected` with a short reason; they never raise
anything else (the event server still guards against it).  Limits, the same on both
paths: 16 MB; documents and arrays nested at most :data:`MAX_DEPTH` (100) levels
deep, the event itself being the first level (MongoDB stores no deeper document);
for JSON also strict UTF-8, no NaN or Infinity, integers within 64 bits, no key twice
in one object.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import re
import struct
from typing import Any

import bson
from bson import ObjectId
from bson.codec_options import CodecOptions

from zarkov import positions
from zarkov.errors import ZarkovError
from zarkov.eventlog.stream import Stream
from zarkov.oneline import first_line as clip
from zarkov.oneline import short_repr as _short

# MongoDB refuses documents over 16 MiB; keep room for the fields added here.
MAX_BSON_SIZE = 16 * 1024 * 1024
MAX_EVENT_SIZE = MAX_BSON_SIZE - 1024

# MongoDB refuses documents nested more than 100 levels (each document or array is
# one, the event itself the first).  Why check it here: a deeper event would wait in
# the journal for a database that refuses it, and deep JSON would exhaust Python's
# recursion limit.
MAX_DEPTH = 100

FIELDS = frozenset(("_id", "timestamp", "type", "context", "extra"))
NOVAL = "event_noval"

_CODEC: CodecOptions = CodecOptions(tz_aware=False)
_INT32 = struct.Struct("<i")
_INT64 = struct.Struct("<q")
_ID_PREFIX = b"\x07_id\x00"
_SEQ_PREFIX = b"\x12" + positions.SEQ_FIELD.encode() + b"\x00"
_TS_PREFIX = b"\x09timestamp\x00"
_EMPTY_CONTEXT = b"\x03context\x00\x05\x00\x00\x00\x00"
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


#: Where positions come from when the caller gives none (tools and tests).
_detached: "Stream | None" = None


def _default_ids() -> "Stream":
    global _detached
    if _detached is None:
        _detached = Stream.detached()
    return _detached


class Rejected(ZarkovError):
    """A message that is not a valid event; the message says why, in a few words."""


_TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep"
_CONTROL = re.compile("[\x00-\x1f]")
# Each level of a BSON nest takes at least 7 bytes (type, key NUL, length, end NUL)
# and the innermost document 5: a smaller message cannot be too deep (why: most
# events are, and the walk would cost them ~2 us each).
_BSON_DEEP_FROM = 5 + 7 * MAX_DEPTH


def check_depth(doc: Any) -> None:
    """Raise Rejected when documents and arrays nest more than MAX_DEPTH levels
    (``doc`` is the first).  Iterative: no recursion limit to hit."""
    stack = [(doc, 1)]
    while stack:
        obj, depth = stack.pop()
        for value in (obj.values() if isinstance(obj, dict) else obj):
            if isinstance(value, (dict, list)):
                if depth >= MAX_DEPTH:
                    raise Rejected(_TOO_DEEP)
                stack.append((value, depth + 1))


def now_millis() -> int:
    """The current time as BSON stores datetimes: milliseconds since the epoch."""
    return int((_dt.datetime.now(_dt.timezone.utc) - _EPOCH).total_seconds() * 1000)


def _check_fields(doc: dict) -> None:
    for key in doc:
        if key not in FIELDS:
            raise Rejected(f"unknown field {_short(key)}")
    if "type" not in doc:
        raise Rejected("missing field 'type'")
    if type(doc["type"]) is not str:  # not bson's Code, a str subclass
        raise Rejected(f"field 'type' must be a string, got {type(doc['type']).__name__}")
    if "timestamp" in doc and not isinstance(doc["timestamp"], _dt.datetime):
        raise Rejected("field 'timestamp' must be a datetime, "
                       f"got {type(doc['timestamp']).__name__}")
    if "context" in doc and not isinstance(doc["context"], dict):
        raise Rejected("field 'context' must be a document, "
                       f"got {type(doc['context']).__name__}")


def _command(doc: dict) -> Any:
    cmd = doc["$command"]
    if cmd != NOVAL:
        raise Rejected(f"unknown $command {_short(cmd)}")
    # Why: a top-level field name with a control character is never meant, and the
    # bundled FerretDB stores it unescaped, after which no query can scan the
    # collection.  Other events have only the known top-level fields.
    for key in doc:
        if isinstance(key, str) and _CONTROL.search(key):
            raise Rejected(f"field name {_short(key)} holds a control character")
    if positions.SEQ_FIELD in doc:
        raise Rejected(f"field {positions.SEQ_FIELD!r} is reserved for the event logger")
    return cmd


def decode_many(msgs: list[bytes]) -> "list[dict] | None":
    """The documents of BSON messages decoded in one call, or None when any message is
    not exactly one valid BSON document within the size limit (then
    :func:`prepare_bson` decodes each alone and names what is wrong with it).

    Why: the decoder reads its options anew on every call, which costs a third of
    decoding a small event; one call for a batch pays it once.
    """
    size = _INT32.unpack_from
    for msg in msgs:
        # Each message's own length must be its declared one: then the documents of
        # the joined bytes are exactly the messages, one each.
        if not 5 <= len(msg) <= MAX_EVENT_SIZE or size(msg)[0] != len(msg):
            return None
    try:
        docs = bson.decode_all(b"".join(msgs), _CODEC)
    except Exception:  # noqa: BLE001 - some message is not valid: decode each alone
        return None
    return docs if len(docs) == len(msgs) else None


def prepare_bson(msg: bytes, now_ms: int, ids: "Stream | None" = None,
                 doc: "dict | None" = None) -> bytes:
    """Validate one BSON message and return the document to journal and store.

    ``now_ms`` is the receive time (milliseconds since the epoch) used when the event
    has no timestamp; ``ids`` the stream its position comes from (the journal's);
    ``doc`` the message already decoded (by :func:`decode_many`), if it was.
    Raises Rejected when the message is not a valid event.
    """
    size = len(msg)
    if size > MAX_EVENT_SIZE:
        raise Rejected(f"message of {size} bytes is over the 16 MB limit")
    if doc is None:
        try:
            doc = bson.decode(msg, _CODEC)
        except Exception as e:  # noqa: BLE001 - InvalidBSON and friends: not one document
            if "recursion" in str(e):  # what pymongo says past ~1000 levels
                raise Rejected(_TOO_DEEP) from None
            raise Rejected(f"not a BSON document ({clip(e)})") from None
    if size >= _BSON_DEEP_FROM:
        check_depth(doc)
    if "$command" in doc:
        _command(doc)
        del doc["$command"]
        if "_id" not in doc:
            doc = _positioned(doc, ids)
        return _encode(doc)
    _check_fields(doc)
    # Splice the missing fields in front of the received elements (why: no re-encoding).
    head = b""
    if "_id" not in doc:
        oid, seq = (ids or _default_ids()).take()
        head = _ID_PREFIX + oid + _SEQ_PREFIX + _INT64.pack(seq)
    if "timestamp" not in doc:
        head += _TS_PREFIX + _INT64.pack(now_ms)
    if "context" not in doc:
        head += _EMPTY_CONTEXT
    if not head:
        return msg
    return _INT32.pack(size + len(head)) + head + msg[4:]


def _reject_constant(name: str) -> None:
    raise Rejected(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    # Why: "1e999" parses as inf, which MongoDB-compatible servers may refuse.
    value = float(text)
    if not math.isfinite(value):
        raise Rejected(f"number {_short(text)} is out of range")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise Rejected(f"duplicate key {_short(key)}")
            seen.add(key)
    return obj


def json_to_doc(obj: Any, depth: int = 1) -> Any:
    """Replace every ``{"$datetime": <unix seconds>}`` in a parsed JSON value with a UTC
    datetime; raise Rejected past MAX_DEPTH levels (``obj`` is at level ``depth``)."""
    if isinstance(obj, dict):
        if "$datetime" in obj:
            value = obj["$datetime"]
            if len(obj) != 1 or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise Rejected("'$datetime' must be the only key, with a number of seconds")
            try:
                return _EPOCH + _dt.timedelta(seconds=value)
            except OverflowError:
                raise Rejected(f"'$datetime' {_short(value)} is out of range") from None
        if depth > MAX_DEPTH:
            raise Rejected(_TOO_DEEP)
        return {k: json_to_doc(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        if depth > MAX_DEPTH:
            raise Rejected(_TOO_DEEP)
        return [json_to_doc(v, depth + 1) for v in obj]
    return obj


def loads(text: str | bytes) -> Any:
    """Parse JSON as the event logger does: strict UTF-8, no NaN or infinities, no
    duplicate keys, not too deep; Rejected if it is not such JSON."""
    if not isinstance(text, str):
        try:
            text = bytes(text).decode("utf-8")  # strictly: no surrogates, no other encoding
        except UnicodeDecodeError as e:
            raise Rejected(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                          object_pairs_hook=_object)
    except ValueError as e:
        raise Rejected(f"not JSON ({clip(e)})") from None
    except RecursionError:  # the C parser stops near Python's recursion limit
        raise Rejected(_TOO_DEEP) from None


def parse_json(text: str | bytes) -> dict:
    """Parse one JSON object (with ``$datetime`` values) into an event document."""
    return event_from_json(loads(text))


def event_from_json(obj: Any) -> dict:
    """The event document of one parsed JSON value; Rejected unless it is an object."""
    doc = json_to_doc(obj)
    if not isinstance(doc, dict):  # {"$datetime": 0} alone is a datetime, not an event
        raise Rejected(f"a JSON {'$datetime' if isinstance(obj, dict) else type(obj).__name__}"
                       " is not an event object")
    return doc


def prepare_json(msg: bytes, now_ms: int, ids: "Stream | None" = None) -> bytes:
    """Validate one JSON message and return the BSON document to journal and store."""
    if len(msg) > MAX_EVENT_SIZE:
        raise Rejected(f"message of {len(msg)} bytes is over the 16 MB limit")
    doc = parse_json(msg)
    return _prepare(doc, now_ms, ids)  # json_to_doc checked the depth


def prepare_doc(doc: dict, now_ms: int, ids: "Stream | None" = None) -> bytes:
    """Validate a decoded event document and return its BSON, ``_id`` first."""
    check_depth(doc)
    return _prepare(doc, now_ms, ids)


def _positioned(doc: dict, ids: "Stream | None") -> dict:
    """``doc`` with a position from ``ids``: ``_id`` and ``_seq`` first."""
    oid, seq = (ids or _default_ids()).take()
    return {"_id": ObjectId(oid), positions.SEQ_FIELD: positions.seq_value(seq), **doc}


def _prepare(doc: dict, now_ms: int, ids: "Stream | None") -> bytes:
    if "$command" in doc:
        _command(doc)
        out = dict(doc)
        del out["$command"]
    else:
        _check_fields(doc)
        out = dict(doc)
        if "timestamp" not in out:
            out["timestamp"] = _EPOCH + _dt.timedelta(milliseconds=now_ms)
        out.setdefault("context", {})
    if "_id" not in out:
        out = _positioned(out, ids)
    return _encode(out)


def _encode(doc: dict) -> bytes:
    try:
        data = bson.encode(doc)
    except OverflowError:  # why not check while parsing JSON: a hook per number costs
        raise Rejected("an integer does not fit in 64 bits") from None
    except Exception as e:  # noqa: BLE001 - a lone surrogate, a key with a NUL ...
        raise Rejected(f"cannot be stored as BSON ({clip(e)})") from None
    if len(data) > MAX_BSON_SIZE:
        raise Rejected(f"event of {len(data)} bytes is over the 16 MB limit")
    return data
