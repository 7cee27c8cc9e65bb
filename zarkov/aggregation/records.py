"""Run records: one document per AggDef in ``agg_run`` holding its run's state.

``{_id: name, run_id, full, attempt, state, started, marked, ranges, host, pid,
outputs}``; ``ranges`` are the positions the run takes (``{stream, after, upto}``,
:mod:`zarkov.aggregation.positions`), ``marked`` the documents without a position it
marked (:mod:`zarkov.aggregation.marks`); docs/exactly-once.md gives the states.
Only the holder of the AggDef's lease writes its record, and every write is filtered
on the run id, so a process that lost the lease (it stalled past the lease's term)
finds its writes matching nothing and stops.
"""
from __future__ import annotations

import os
import uuid
from datetime import datetime
from typing import Optional, Sequence

from zarkov.aggregation.scope import Scope
from zarkov.lease import HOST, LeaseLost, utcnow
from zarkov.positions import Range


def pending(scope: Scope) -> Optional[dict]:
    """The record of a run that a killed process left, if any."""
    return scope.db.agg_run.find_one({"_id": scope.name})


def live_run_ids(scope: Scope) -> set:
    """Run ids of every AggDef's pending run in the database."""
    return {r["run_id"] for r in scope.db.agg_run.find({}, {"run_id": 1})}


def begin(scope: Scope, full: bool, marked: int = 0, ranges: Sequence[Range] = (),
          swept: Optional[datetime] = None) -> dict:
    """Create the record of a new run, in state ``marking``.

    ``marked``: documents the run is about to mark (an incremental run counts them
    before writing, so that the record never undercounts its marks); ``ranges``:
    the positions it takes; ``swept``: when its sweep began, if it swept.
    """
    started = utcnow()
    record = {"_id": scope.name, "run_id": uuid.uuid4().hex, "full": bool(full),
              "attempt": 0, "state": "marking", "started": started, "marked": marked,
              "ranges": [r.as_doc() for r in ranges],
              "swept": started if full else swept,
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


def ranges(record: dict) -> list[Range]:
    """The positions a run takes (none in a record made before positions)."""
    return [Range.from_doc(r) for r in record.get("ranges") or []]


def positioned(record: dict) -> int:
    """How many positions the run takes (an upper bound of its positioned events:
    a position whose event the database refused holds none)."""
    return sum(len(r) for r in ranges(record))


def selection(record: dict, name: str) -> dict:
    """The filter of a run's documents: its ranges of positions, its marked documents
    (``{jobs: run_id}``), and in a full run those already counted by their flag."""
    clauses = [r.clause() for r in ranges(record)]
    if record["full"] or record["marked"]:
        clauses.append({"jobs": record["run_id"]})
    if record["full"]:
        clauses.append({"aggregates": name})
    if not clauses:  # a record that takes nothing (never made so): selects nothing
        return {"jobs": record["run_id"]}
    return clauses[0] if len(clauses) == 1 else {"$or": clauses}
