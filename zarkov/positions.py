"""Positions: where an event stands in the stream of the event logger that stored it.

The event logger gives every event it stores a *position* before journaling it:
its **stream** (8 bytes: one per journal directory, kept across clean restarts, a
new one after a crash) and its **sequence number** in that stream (1, 2, 3 …).
Both live in the event's ``_id``, an ObjectId whose first 8 bytes are the stream
and last 4 the sequence number, big-endian; the event also carries the number as
``_seq`` (Int64).  So that:

* the ids of one stream sort by sequence number: a range of positions is a range
  of ``_id`` (an index scan on MongoDB);
* the ids of a range can be named one by one and fetched by ``_id``, which every
  server answers from its ``_id`` index (:mod:`zarkov.storage.reads`);
* a replay of the journal stores the same ``_id`` again: nothing is stored twice.

``_seq`` tells a positioned event from one without a position (written by another
program, imported, or stored before positions existed), which runs count by marks
(:mod:`zarkov.aggregation.marks`); an index on ``(_seq, aggregates)`` finds those.

The stream's first 4 bytes are the time it began, so an event's
``_id.generation_time`` is when its stream began, not when it happened: use its
``timestamp``.

A :class:`Range` ``(stream, after, upto]`` names the positions a run takes; as a
filter it is ``{_id: {$gt: <after>, $lte: <upto>}}`` (:meth:`Range.clause`), which
:func:`parse_clause` recognises again where a server cannot serve it as a range.
"""
from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from bson import ObjectId
from bson.int64 import Int64

#: The field holding an event's sequence number: present only on positioned events.
SEQ_FIELD = "_seq"
#: Bytes of a stream id (the first bytes of the ObjectId).
STREAM_BYTES = 8
#: The highest sequence number of a stream (4 bytes); the next event starts a new one.
SEQ_MAX = 0xFFFFFFFF

_SEQ = struct.Struct(">I")
_INT64 = struct.Struct("<q")
#: The first bytes after a BSON document's length when it starts with an ObjectId
#: ``_id`` and an Int64 ``_seq``: how the committer knows a positioned record.
_ID_HEAD = b"\x07_id\x00"
_SEQ_HEAD = b"\x12_seq\x00"
_SEQ_AT = 4 + len(_ID_HEAD) + 12
#: (``_id`` element head, where the ObjectId starts, ``_seq`` element head, where it
#: starts): what :func:`of_record` checks, for loops that inline it.
RECORD_HEAD = (_ID_HEAD, 4 + len(_ID_HEAD), _SEQ_HEAD, _SEQ_AT)


def new_stream() -> bytes:
    """A new stream id: the time now (seconds) and 4 random bytes."""
    return _SEQ.pack(int(time.time()) & 0xFFFFFFFF) + os.urandom(4)


def key(stream: bytes) -> str:
    """A stream id as the text used in documents (hex, 16 characters)."""
    return stream.hex()


def stream_of(text: str) -> bytes:
    """The stream id named by :func:`key`; ValueError when it is not one."""
    raw = bytes.fromhex(text)
    if len(raw) != STREAM_BYTES:
        raise ValueError(f"not a stream id: {text!r}")
    return raw


def id_bytes(stream: bytes, seq: int) -> bytes:
    """The 12 bytes of the ObjectId of position ``seq`` of ``stream``."""
    return stream + _SEQ.pack(seq)


def oid(stream: bytes, seq: int) -> ObjectId:
    """The ObjectId of position ``seq`` of ``stream``."""
    return ObjectId(stream + _SEQ.pack(seq))


def seq_value(seq: int) -> Int64:
    """The value of :data:`SEQ_FIELD` (always an Int64, whatever its size)."""
    return Int64(seq)


def of_record(doc: bytes) -> Optional[tuple[bytes, int]]:
    """``(stream, seq)`` of a raw BSON event stored by the event logger, else None.

    The logger writes ``_id`` and ``_seq`` as the first two fields of every event
    it positions; a client cannot send ``_seq`` (the schema refuses it), so those
    first bytes say it.
    """
    if doc[4:4 + len(_ID_HEAD)] != _ID_HEAD or \
            doc[_SEQ_AT:_SEQ_AT + len(_SEQ_HEAD)] != _SEQ_HEAD:
        return None
    start = 4 + len(_ID_HEAD)
    return doc[start:start + STREAM_BYTES], _SEQ.unpack_from(doc, start + STREAM_BYTES)[0]


@dataclass(frozen=True)
class Range:
    """The positions ``after < seq <= upto`` of one stream (hex ``stream``)."""

    stream: str
    after: int
    upto: int

    def __len__(self) -> int:
        return max(0, self.upto - self.after)

    def clause(self) -> dict:
        """The range as a filter: ``{_id: {$gt: …, $lte: …}}``."""
        raw = stream_of(self.stream)
        return {"_id": {"$gt": oid(raw, self.after), "$lte": oid(raw, self.upto)}}

    def ids(self) -> Iterator[ObjectId]:
        """The ObjectId of every position of the range, in order."""
        raw = stream_of(self.stream)
        for seq in range(self.after + 1, self.upto + 1):
            yield ObjectId(raw + _SEQ.pack(seq))

    def as_doc(self) -> dict:
        """``{stream, after, upto}``, as kept in a run record (a document: FerretDB
        stores no array in an array)."""
        return {"stream": self.stream, "after": self.after, "upto": self.upto}

    @classmethod
    def from_doc(cls, doc: Any) -> "Range":
        """The inverse of :meth:`as_doc`."""
        return cls(str(doc["stream"]), int(doc["after"]), int(doc["upto"]))


def parse_clause(clause: Any) -> Optional[Range]:
    """The :class:`Range` a filter made by :meth:`Range.clause` names, else None."""
    if not isinstance(clause, dict) or list(clause) != ["_id"]:
        return None
    bounds = clause["_id"]
    if not isinstance(bounds, dict) or sorted(bounds) != ["$gt", "$lte"]:
        return None
    low, high = bounds["$gt"], bounds["$lte"]
    if not (isinstance(low, ObjectId) and isinstance(high, ObjectId)):
        return None
    lb, hb = low.binary, high.binary
    if lb[:STREAM_BYTES] != hb[:STREAM_BYTES]:
        return None
    return Range(key(lb[:STREAM_BYTES]), _SEQ.unpack_from(lb, STREAM_BYTES)[0],
                 _SEQ.unpack_from(hb, STREAM_BYTES)[0])
