"""Marks and flags on the input documents that have no position (docs/exactly-once.md).

Events the event logger stored have a position and are taken by it
(:mod:`zarkov.aggregation.positions`): nothing is ever written to them.  The others (written
by other programs, imported, or stored before positions existed: no ``_seq``) are
counted as follows.  A run *marks* those it takes that are not yet counted by adding
its run id to their ``jobs``; its jobs read ``{jobs: run_id}`` (a full run's also
the documents already flagged).  Once every output holds their contribution the run
*flags* the marked documents: the AggDef's name goes into ``aggregates`` and the run
id leaves ``jobs``.  Documents already flagged are never written again, so a full
run over a collection already counted writes nothing per document.  A rolled-back
run only takes its marks off.  Every step is idempotent, so a killed run's
successor simply does it again.  All of this happens in every collection of the
run's input (``event`` and the rotated ``event.0`` … where they exist).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Optional

from pymongo import UpdateOne

from zarkov.aggregation import records
from zarkov.aggregation.scope import Scope, batches
from zarkov.lease import Lease
from zarkov.positions import SEQ_FIELD, Range

#: Ids of documents by input collection.
Ids = dict

#: Seconds between two checks of the indexes of one input collection by one process
#: (``zcmd rotate`` gives ``event`` a fresh collection without them).
INDEX_CHECK_EVERY = 300.0

#: (client, database, collection) -> when this process last made sure of its indexes.
_indexed: dict = {}


def ensure_indexes(scope: Scope) -> None:
    """Indexes that let runs find and read marked and flagged documents, and those
    without a position, without a scan (checked at a process's first run and every
    INDEX_CHECK_EVERY seconds, not at every run).  Only where the server answers
    queries from such indexes (MongoDB): elsewhere they would cost every insert and
    serve no read."""
    if not scope.writes.caps.indexed_filters:
        return
    now = time.monotonic()
    for name in scope.inputs:
        key = (id(scope.db.client), scope.db.name, name)
        if now - _indexed.get(key, -INDEX_CHECK_EVERY) < INDEX_CHECK_EVERY:
            continue
        coll = scope.db[name]
        coll.create_index("aggregates")
        coll.create_index("jobs")
        coll.create_index([(SEQ_FIELD, 1), ("aggregates", 1)])
        _indexed[key] = now


@contextmanager
def _input_lock(scope: Scope) -> Iterator[None]:
    """A lease on the input collection while writing marks or flags, where needed.

    FerretDB updates documents by read-modify-write without a lock, so two runs of
    different AggDefs updating ``jobs``/``aggregates`` of the same documents at once
    could lose one's change.  Serialising those short phases per input collection
    avoids it; where single-document updates are atomic (MongoDB, mongo-java-server:
    ``storage``) there is nothing to avoid and no lease is taken.
    """
    if scope.writes.caps.atomic_updates:
        yield
        return
    lock = Lease(scope.db.agg_lease, {"object": scope.events.name},
                 scope.config.agg_lease_seconds)
    # Held for seconds at most: ask again often rather than sleep past its release.
    lock.acquire(wait=True, poll=0.02, max_poll=0.1)
    lock.start_renewing()
    try:
        yield
    finally:
        lock.release()


def _uncounted(scope: Scope, **more) -> dict:
    """The filter of the documents without a position the AggDef has not counted."""
    return {SEQ_FIELD: None, "aggregates": {"$ne": scope.name}, **more}


def candidates(scope: Scope, limit: int) -> Ids:
    """Ids of documents without a position that a run would mark now, by input
    collection: not yet counted, at most ``limit``.  Read before any write (on
    FerretDB a multi-document write waits for open cursors on the same collection)."""
    out: Ids = {}
    for name in scope.inputs:
        if limit <= 0:
            break
        ids = [d["_id"] for d in scope.db[name].find(_uncounted(scope), {"_id": 1}).limit(limit)]
        if ids:
            out[name] = ids
            limit -= len(ids)
    return out


def count(ids: Ids) -> int:
    """How many documents ``ids`` names."""
    return sum(map(len, ids.values()))


def _count_marked(scope: Scope, run_id: str) -> int:
    return sum(scope.db[n].count_documents({"jobs": run_id}) for n in scope.inputs)


def mark(scope: Scope, record: dict, ids: Optional[Ids] = None,
         fresh: bool = False) -> tuple[int, Optional[Ids]]:
    """Add the run id to the ``jobs`` of the documents without a position this run
    takes (in every input collection).

    Returns ``(marked, ids)``: how many documents carry the run id, and their ids
    when they are exactly ``ids`` (so that flagging needs no search), else None.

    ``fresh``: the record was just created (nothing can be marked yet).
    Incremental: ``ids`` (from :func:`candidates`, the record created with ``marked``
    already counting them), marked by ``_id`` in batches; or, resuming a killed
    run, more documents not yet counted, up to ``zmr.event_limit`` with those already
    marked and the run's positions, ``marked`` being raised before each batch is
    written so that it never undercounts (0 means nothing was ever marked).  Full:
    every document not yet counted, in one statement per collection (those already
    counted are read by their flag).  Both resume: documents already marked are
    skipped, marking twice changes nothing.
    """
    run_id = record["run_id"]
    scope.report("marking", record["marked"])
    with _input_lock(scope):
        if record["full"]:
            done = 0
            for name in scope.inputs:
                res = scope.db[name].update_many(_uncounted(scope, jobs={"$ne": run_id}),
                                                 {"$addToSet": {"jobs": run_id}})
                done += res.modified_count
                scope.report("marking", done)
            scope.hook("marking")
            if fresh:  # nothing was marked before these statements
                return done, None
            return _count_marked(scope, run_id), None
        if ids is not None:
            matched = sum(_write_by_id(scope, name, some, {"$addToSet": {"jobs": run_id}},
                                       "marking") for name, some in ids.items())
            if matched == count(ids):
                return matched, ids
            # Some vanished before they were marked: count what was.
            return _count_marked(scope, run_id), None
        remaining = (scope.config.zmr.event_limit - record["marked"]
                     - sum(len(Range.from_doc(r)) for r in record.get("ranges", [])))
        for name in scope.inputs:
            if remaining <= 0:
                break
            more = [d["_id"] for d in scope.db[name].find(
                _uncounted(scope, jobs={"$ne": run_id}), {"_id": 1}).limit(remaining)]
            _write_by_id(scope, name, more, {"$addToSet": {"jobs": run_id}}, "marking", record)
            remaining -= len(more)
        return _count_marked(scope, run_id), None


def flag(scope: Scope, record: dict, ids: Optional[Ids] = None) -> None:
    """Give the run's marked documents the AggDef name and take the run id off them.

    ``ids``: the marked documents, when this process marked them all (no search).
    """
    _unmark(scope, record, {"$addToSet": {"aggregates": scope.name},
                            "$pull": {"jobs": record["run_id"]}}, "flagging", ids)


def unmark(scope: Scope, record: dict, ids: Optional[Ids] = None) -> None:
    """Take the run id off its documents (rolling the run back)."""
    _unmark(scope, record, {"$pull": {"jobs": record["run_id"]}}, "rollback", ids)


def _unmark(scope: Scope, record: dict, update: dict, phase: str,
            ids: Optional[Ids]) -> None:
    """Apply ``update`` to every document marked with the run id (idempotent)."""
    run_id = record["run_id"]
    scope.report(phase, 0)
    if record["marked"] == 0 and not (record["full"] and record["state"] == "marking"):
        # Nothing was ever marked (a full run counts its marks once they are all
        # written, an incremental one before writing them): nothing to search for.
        scope.hook(phase)
        return
    with _input_lock(scope):
        if record["full"]:
            for name in scope.inputs:
                scope.db[name].update_many({"jobs": run_id}, update)
            scope.report(phase, int(record["marked"]))
            scope.hook(phase)
            return
        if ids is None:
            ids = {name: [d["_id"] for d in scope.db[name].find({"jobs": run_id}, {"_id": 1})]
                   for name in scope.inputs}
        for name, some in ids.items():
            _write_by_id(scope, name, some, update, phase)


def _write_by_id(scope: Scope, name: str, ids: list, update: dict, phase: str,
                 record: Optional[dict] = None) -> int:
    """Apply ``update`` to documents ``ids`` of collection ``name``, in batches of
    single-document updates; return how many documents matched.

    By ``_id`` because FerretDB pushes only ``_id`` equality down to its storage;
    batches no larger than the server takes in one command (``storage``).  With
    ``record``, its ``marked`` count is raised before each batch is written.
    """
    n = matched = 0
    coll = scope.db[name]
    for batch in batches(ids, scope.writes.caps.update_batch):
        scope.lease.check()
        if record is not None:
            records.update(scope, record, {"marked": record["marked"] + len(batch)})
        res = coll.bulk_write([UpdateOne({"_id": i}, update) for i in batch], ordered=False)
        matched += res.matched_count
        n += len(batch)
        scope.report(phase, n)
        scope.hook(phase)
    return matched
