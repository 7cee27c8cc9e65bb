"""The registry of event streams: how far each stream is durably stored.

One document per stream (:mod:`zarkov.positions`) in ``event_stream``::

    {_id: <stream, hex>, collection: "event", stored: <seq>, host, pid, journal,
     started, updated}

``stored`` is the stream's *bound*: every event of the stream at or below it is in
the collection (or was refused by the database and set aside), so a run may take
the positions up to it and no further.  Only the committer that holds the stream's
journal directory writes it, after each insert (``$max``: it never goes back); a
stream whose logger stopped or died keeps its last bound and holds no other stream
back.  The events of a stream missing from the registry are simply not taken yet.
"""
from __future__ import annotations

import os
import socket
from datetime import datetime
from typing import Any

from bson.int64 import Int64
from pymongo.collection import Collection
from pymongo.database import Database

from zarkov import positions
from zarkov.lease import utcnow

COLLECTION = "event_stream"


def registry(db: Database) -> Collection:
    """The ``event_stream`` collection of ``db``."""
    return db[COLLECTION]


def bounds_of(docs: list[bytes]) -> dict[bytes, int]:
    """The highest position of each stream among raw events ``docs`` (as journaled:
    each stream's positions in order)."""
    out: dict[bytes, int] = {}
    head, at, seq_head, seq_at = positions.RECORD_HEAD
    stream_end = at + positions.STREAM_BYTES
    # From the end, the first record of a stream is its highest (in journal order);
    # no call per record: this runs once per event stored.
    for doc in reversed(docs):
        if doc[4:at] == head and doc[seq_at:seq_at + len(seq_head)] == seq_head:
            stream = doc[at:stream_end]
            if stream not in out:
                out[stream] = int.from_bytes(doc[stream_end:stream_end + 4], "big")
    return out


def publish(db: Database, collection: str, bounds: dict[bytes, int], journal: str) -> None:
    """Record that each stream of ``bounds`` is stored in ``collection`` up to its value."""
    now = utcnow()
    for stream, seq in bounds.items():
        registry(db).update_one(
            {"_id": positions.key(stream)},
            {"$max": {"stored": Int64(seq)},
             "$set": {"collection": collection, "host": socket.gethostname(),
                      "pid": os.getpid(), "journal": journal, "updated": now},
             "$setOnInsert": {"started": now}},
            upsert=True)


def bounds(db: Database, collection: str) -> dict[str, int]:
    """``{stream: stored}`` of every stream of ``collection``."""
    return {d["_id"]: int(d["stored"])
            for d in registry(db).find({"collection": collection}, {"stored": 1})}


def listing(db: Database) -> list[dict[str, Any]]:
    """Every stream's document as a committer writes it (``stored`` an integer,
    ``updated`` a time), newest first; anything else in the collection (another
    program's document, a damaged one) is left out."""
    return [d for d in registry(db).find().sort("updated", -1)
            if isinstance(d.get("stored"), int) and isinstance(d.get("updated"), datetime)]
