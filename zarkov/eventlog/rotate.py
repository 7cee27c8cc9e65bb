"""Rotate the event collections: ``event`` → ``event.0`` → ``event.1`` … (README,
"Commands": ``zcmd rotate``).

``num_event_logs`` rotated collections are kept (``event.0`` … ``event.<k-1>``).  The
one that would fall off the end is first written to the dump directory as a BSON
file (documents back to back, as ``mongodump`` writes them), then dropped.  Renames
go from the oldest to the newest so that no rename ever lands on an existing
collection.  Each step moves one collection's documents to the next name with
:meth:`zarkov.storage.Writes.move`: a rename where the server can, else documents
moved in batches (a rerun after a crash completes the move); ``event`` itself is
never dropped then, so events the logger inserts meanwhile stay in it.  Either way
the new ``event`` has the indexes the old one had.

Aggregation runs read the rotated collections too (:func:`chain`): an event rotated
before an AggDef counted it is counted from ``event.0`` …, never lost.  So that no
run reads while documents move (it could read one twice, or miss it), rotate first
takes the lease of every AggDef over ``event`` (:mod:`zarkov.lease`), waiting for the
runs going on to end; runs that start meanwhile find their AggDef busy and try
again later.  Only an AggDef that lags more than ``num_event_logs`` rotations behind
loses events: those of the collection dumped and dropped.
"""
from __future__ import annotations

import datetime as dt
import os

from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo.database import Database

from zarkov import storage
from zarkov.errors import ZarkovError
from zarkov.lease import Lease

COLLECTION = "event"
#: Seconds between two tries of a lease held by a run (held for a run's length).
LEASE_POLL = 0.05


class RotateError(ZarkovError):
    """The collections are not in a state rotate can work from; the message says why."""


def dump_collection(db: Database, name: str, dump_dir: str) -> tuple[str, int]:
    """Write every document of ``name`` to ``<dump_dir>/<db>.<name>.<UTC time>.bson``.

    Returns (path, number of documents).  The file appears complete or not at all.
    """
    os.makedirs(dump_dir, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = os.path.join(dump_dir, f"{db.name}.{name}.{stamp}.bson")
    raw = db.get_collection(name, codec_options=CodecOptions(document_class=RawBSONDocument))
    count = 0
    with open(path + ".tmp", "wb") as f:
        for doc in raw.find(batch_size=5000):
            f.write(doc.raw)
            count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return path, count


def _move(db: Database, source: str, target: str) -> str:
    """Move ``source`` to ``target`` (see the module docstring); what was done."""
    how = storage.writes(db).move(source, target, drop_source=source != COLLECTION)
    if how == storage.MOVED_BY_RENAME:
        if source == COLLECTION:  # the logger's next inserts create it: same indexes
            storage.copy_indexes(db, target, COLLECTION)
        return f"renamed {source} to {target}"
    return f"moved the documents of {source} to {target} ({how}: the server does not rename it)"


def chain(db: Database, name: str, keep: int) -> list[str]:
    """The collections holding the events of input collection ``name``: ``name``
    itself, and for ``event`` the rotated ones (``keep`` at most) that exist, newest
    first."""
    if name != COLLECTION:
        return [name]
    existing = set(db.list_collection_names())
    return [name] + [c for c in (f"{COLLECTION}.{i}" for i in range(keep)) if c in existing]


def _hold_aggdefs(db: Database, lease_seconds: float) -> list[Lease]:
    """The leases of every AggDef over ``event``, taken in name order (waiting)."""
    names = sorted(d["name"] for d in db.agg_def.find(
        {"object": {"$in": [COLLECTION, None, ""]}}, {"name": 1}))
    held: list[Lease] = []
    try:
        for name in names:
            lease = Lease(db.agg_lease, name, lease_seconds)
            lease.acquire(wait=True, poll=LEASE_POLL, max_poll=10 * LEASE_POLL)
            lease.start_renewing()
            held.append(lease)
    except BaseException:
        _release(held)
        raise
    return held


def _release(leases: list[Lease]) -> None:
    for lease in reversed(leases):
        lease.release()


def rotate(db: Database, dump_dir: str, keep: int, lease_seconds: float = 60.0) -> list[str]:
    """Rotate the event collections of ``db``, keeping ``keep``; returns what was done.

    Holds the lease of every AggDef over ``event`` meanwhile (``lease_seconds``
    each, renewed), so that no run reads the collections while they move.
    """
    if keep < 1:
        raise RotateError(f"num_event_logs must be at least 1, got {keep}")
    leases = _hold_aggdefs(db, lease_seconds)
    try:
        return _rotate(db, dump_dir, keep)
    finally:
        _release(leases)


def _rotate(db: Database, dump_dir: str, keep: int) -> list[str]:
    names = set(db.list_collection_names())
    done: list[str] = []
    chain = [COLLECTION] + [f"{COLLECTION}.{i}" for i in range(keep)]
    oldest = chain[-1]
    if oldest in names:
        path, count = dump_collection(db, oldest, dump_dir)
        done.append(f"dumped {oldest} ({count} documents) to {path}")
        db.drop_collection(oldest)
        done.append(f"dropped {oldest}")
        names.discard(oldest)
    for newer, older in reversed(list(zip(chain, chain[1:]))):
        if newer not in names:
            continue
        if older in names:
            raise RotateError(f"{db.name}.{older} exists while {newer} is to be renamed "
                              "to it: was a rotate interrupted? move one of them away")
        done.append(_move(db, newer, older))
        names.discard(newer)
        names.add(older)
    return done
