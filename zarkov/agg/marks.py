"""Marks and flags on the input documents (docs/exactly-once.md).

A run *marks* the documents it takes by adding its run id to their ``jobs``; the
Task's jobs read only ``{jobs: run_id}``.  Once every output holds their
contribution it *flags* them: the AggDef's name goes into ``aggregates`` and the run
id leaves ``jobs``.  A rolled-back run only takes its marks off.  Every step is
idempotent, so a killed run's successor simply does it again.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from pymongo import UpdateOne

from zarkov.agg import Scope, batches, records
from zarkov.lease import Lease


def ensure_indexes(scope: Scope) -> None:
    """Indexes that let runs select new and marked documents without a scan."""
    scope.events.create_index("aggregates")
    scope.events.create_index("jobs")


@contextmanager
def _input_lock(scope: Scope) -> Iterator[None]:
    """A lease on the input collection while writing marks or flags.

    FerretDB updates documents by read-modify-write without a lock, so two runs of
    different AggDefs updating ``jobs``/``aggregates`` of the same documents at once
    could lose one's change.  Serialising those short phases per input collection
    avoids it everywhere (on MongoDB it only costs a little waiting).
    """
    lock = Lease(scope.db.agg_lease, {"object": scope.events.name},
                 scope.config.agg_lease_seconds)
    lock.acquire(wait=True)
    lock.start_renewing()
    try:
        yield
    finally:
        lock.release()


def mark(scope: Scope, record: dict) -> None:
    """Add the run id to the ``jobs`` of the documents this run takes.

    Incremental: documents whose ``aggregates`` lacks the name, at most
    ``zmr.event_limit``, marked by ``_id`` in batches; ``marked`` is raised before
    each batch is written, so it never undercounts (0 means nothing was ever marked).
    Full: every document, in one statement.  Both resume: documents already marked
    are skipped, marking twice changes nothing.
    """
    run_id = record["run_id"]
    scope.report("marking", record["marked"])
    with _input_lock(scope):
        if record["full"]:
            scope.events.update_many({"jobs": {"$ne": run_id}},
                                     {"$addToSet": {"jobs": run_id}})
            records.update(scope, record,
                           {"marked": scope.events.count_documents({"jobs": run_id})})
            scope.report("marking", record["marked"])
            scope.hook("marking")
            return
        remaining = scope.config.zmr.event_limit - record["marked"]
        if remaining > 0:
            # Every id read before writing: on FerretDB a multi-document write waits
            # for open cursors on the same collection.
            ids = [d["_id"] for d in scope.events.find(
                {"aggregates": {"$ne": scope.name}, "jobs": {"$ne": run_id}},
                {"_id": 1}).limit(remaining)]
            _write_by_id(scope, ids, {"$addToSet": {"jobs": run_id}}, "marking", record)


def flag(scope: Scope, record: dict) -> None:
    """Give the run's documents the AggDef name and take the run id off them."""
    _unmark(scope, record, {"$addToSet": {"aggregates": scope.name},
                            "$pull": {"jobs": record["run_id"]}}, "flagging")


def unmark(scope: Scope, record: dict) -> None:
    """Take the run id off its documents (rolling the run back)."""
    _unmark(scope, record, {"$pull": {"jobs": record["run_id"]}}, "rollback")


def _unmark(scope: Scope, record: dict, update: dict, phase: str) -> None:
    """Apply ``update`` to every document marked with the run id (idempotent)."""
    run_id = record["run_id"]
    scope.report(phase, 0)
    with _input_lock(scope):
        if record["full"]:
            scope.events.update_many({"jobs": run_id}, update)
            scope.report(phase, int(record["marked"]))
            scope.hook(phase)
        else:
            ids = [d["_id"] for d in scope.events.find({"jobs": run_id}, {"_id": 1})]
            _write_by_id(scope, ids, update, phase)


def _write_by_id(scope: Scope, ids: list, update: dict, phase: str,
                 record: Optional[dict] = None) -> None:
    """Apply ``update`` to documents ``ids``, in batches of single-document updates.

    By ``_id`` because FerretDB pushes only ``_id`` equality down to its storage;
    batches no larger than the server takes in one command (``storage``).  With
    ``record``, its ``marked`` count is raised before each batch is written.
    """
    n = 0
    for batch in batches(ids, scope.writes.caps.update_batch):
        scope.lease.check()
        if record is not None:
            records.update(scope, record, {"marked": record["marked"] + len(batch)})
        scope.events.bulk_write([UpdateOne({"_id": i}, update) for i in batch], ordered=False)
        n += len(batch)
        scope.report(phase, n)
        scope.hook(phase)
