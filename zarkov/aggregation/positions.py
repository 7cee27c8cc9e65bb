"""How far each AggDef has counted the event streams: the ``agg_position`` collection.

One document per AggDef: ``{_id: name, streams: {<stream>: <seq>, …}, swept}`` —
every event of a stream at or below its number has been counted by the AggDef (a
stream not named: none); ``swept`` is when its last sweep (the look for events
without a position, :mod:`zarkov.aggregation.marks`) began. An incremental run
takes, for each stream whose stored bound (:mod:`zarkov.streams`) is past the
AggDef's position, the range between the two (:func:`new_ranges`, at most
``zmr.event_limit`` events in all); a full run takes every stream from its start.
The ranges are kept in the run record, and the position moves to their ends
(:func:`advance`) in the run's last step, after its outputs are applied: the run
record makes that step idempotent, so a killed run's successor takes the same ranges
and counts them once (docs/exactly-once.md). Nothing is written to the events
themselves.
"""
from __future__ import annotations

from datetime import datetime
from typing import Optional

from pymongo.database import Database

from zarkov import positions, streams
from zarkov.aggregation.scope import Scope
from zarkov.positions import Range

COLLECTION = "agg_position"


def counted_by(db: Database, name: str) -> dict[str, int]:
    """``{stream: seq}``: how far AggDef ``name`` has counted each stream."""
    doc = db[COLLECTION].find_one({"_id": name}) or {}
    return {k: int(v) for k, v in (doc.get("streams") or {}).items()}


def counted(scope: Scope) -> dict[str, int]:
    """``{stream: seq}``: how far the run's AggDef has counted each stream."""
    return counted_by(scope.db, scope.name)


def waiting(db: Database, name: str, collection: str = "event") -> int:
    """Positions stored in ``collection`` that AggDef ``name`` has not counted yet
    (an upper bound of the events: a position whose event was refused holds none).
    Two small reads, whatever the history."""
    done = counted_by(db, name)
    return sum(max(0, bound - done.get(stream, 0))
               for stream, bound in streams.bounds(db, collection).items())


#: Positions tried after an AggDef's, to find its oldest waiting event (a position
#: whose event the database refused holds none).
LAG_PROBES = 4


def lag(db: Database, name: str, collection: str = "event",
        now: Optional[datetime] = None) -> dict:
    """How far AggDef ``name`` is behind what the event logger stored in ``collection``:
    ``waiting`` (positions stored, not yet counted) and ``oldest_age`` (seconds since
    the ``timestamp`` of the oldest waiting event — its receive time unless its sender
    gave one; None when nothing waits).  A few reads by ``_id``, whatever the history;
    events without a position (other programs') are not in these figures."""
    now = now or datetime.utcnow()
    done = counted_by(db, name)
    waiting, oldest = 0, None
    for key, bound in streams.bounds(db, collection).items():
        after = done.get(key, 0)
        if bound <= after:
            continue
        waiting += bound - after
        stream = positions.stream_of(key)
        for seq in range(after + 1, min(bound, after + LAG_PROBES) + 1):
            doc = db[collection].find_one({"_id": positions.oid(stream, seq)},
                                          {"timestamp": 1})
            if doc is not None:
                when = doc.get("timestamp")
                if isinstance(when, datetime) and (oldest is None or when < oldest):
                    oldest = when.replace(tzinfo=None)
                break
    age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else None
    return {"waiting": waiting, "oldest_age": age}


def new_ranges(scope: Scope, limit: Optional[int] = None) -> list[Range]:
    """The positions stored but not yet counted, stream by stream, oldest stream
    first; at most ``limit`` of them (the last range cut short)."""
    done = counted(scope)
    out: list[Range] = []
    room = limit
    for stream, bound in sorted(streams.bounds(scope.db, scope.events.name).items()):
        after = done.get(stream, 0)
        if bound <= after:
            continue
        upto = bound if room is None else min(bound, after + room)
        out.append(Range(stream, after, upto))
        if room is not None:
            room -= upto - after
            if room <= 0:
                break
    return out


def all_ranges(scope: Scope) -> list[Range]:
    """Every stored position of every stream of the input: what a full run takes."""
    return [Range(stream, 0, bound)
            for stream, bound in sorted(streams.bounds(scope.db, scope.events.name).items())
            if bound > 0]


def advance(scope: Scope, ranges: list[Range], swept: Optional[datetime] = None) -> None:
    """Move the AggDef's position to the end of each range, and record when the run's
    sweep began, if it swept (idempotent)."""
    changes: dict = {f"streams.{r.stream}": r.upto for r in ranges}
    if swept is not None:
        changes["swept"] = swept
    if not changes:
        return
    scope.lease.check()
    scope.db[COLLECTION].update_one({"_id": scope.name}, {"$set": changes}, upsert=True)


def last_sweep(scope: Scope) -> Optional[datetime]:
    """When the AggDef's last sweep began (None: never)."""
    doc = scope.db[COLLECTION].find_one({"_id": scope.name}, {"swept": 1}) or {}
    return doc.get("swept")
