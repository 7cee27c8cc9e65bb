"""Run records: one document per AggDef in ``agg_run`` holding its run's state.

``{_id: name, run_id, full, attempt, state, started, marked, host, pid, outputs}``;
docs/exactly-once.md gives the states.  Only the holder of the AggDef's lease writes
its record, and every write is filtered on the run id, so a process that lost the
lease (it stalled past the lease's term) finds its writes matching nothing and stops.
"""
from __future__ import annotations

import os
import uuid
from typing import Optional

from zarkov.agg import Scope
from zarkov.lease import HOST, LeaseLost, utcnow


def pending(scope: Scope) -> Optional[dict]:
    """The record of a run that a killed process left, if any."""
    return scope.db.agg_run.find_one({"_id": scope.name})


def live_run_ids(scope: Scope) -> set:
    """Run ids of every AggDef's pending run in the database."""
    return {r["run_id"] for r in scope.db.agg_run.find({}, {"run_id": 1})}


def begin(scope: Scope, full: bool, marked: int = 0) -> dict:
    """Create the record of a new run, in state ``marking``.

    ``marked``: documents the run is about to mark (an incremental run counts them
    before writing, so that the record never undercounts its marks).
    """
    record = {"_id": scope.name, "run_id": uuid.uuid4().hex, "full": bool(full),
              "attempt": 0, "state": "marking", "started": utcnow(), "marked": marked,
              "host": HOST, "pid": os.getpid(), "outputs": []}
    scope.lease.check()
    scope.db.agg_run.insert_one(record)
    return record


def update(scope: Scope, record: dict, changes: dict) -> None:
    """Write ``changes`` to our own record (lease held, same run) and to ``record``."""
    scope.lease.check()
    res = scope.db.agg_run.update_one({"_id": scope.name, "run_id": record["run_id"]},
                                      {"$set": changes})
    if res.matched_count != 1:
        raise LeaseLost(f"run record of '{scope.name}' changed under us")
    for key, value in changes.items():
        # Dotted keys (``outputs.0.applied``) as the database applied them.
        *path, last = key.split(".")
        target = record
        for part in path:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[last] = value


def delete(scope: Scope, record: dict) -> None:
    """Forget a run that is over (done or rolled back)."""
    scope.db.agg_run.delete_one({"_id": scope.name, "run_id": record["run_id"]})
