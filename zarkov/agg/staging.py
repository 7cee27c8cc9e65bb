"""Staging: the Task's jobs write into collections of the run's own, never into the
targets (docs/exactly-once.md, state ``running``).

Names are ``zstage.<run_id>.<attempt>.<n>`` (an xmapreduce job: the prefix
``zstage.<run_id>.<attempt>.x<n>.``).  A resumed run starts a new attempt, so jobs
of a killed attempt still running in the router write only into collections that
nobody reads and that the run drops.
"""
from __future__ import annotations

import logging
import traceback
from typing import Any

from pymongo.errors import PyMongoError

from zarkov import wire
from zarkov.zmr import client
from zarkov.agg import Scope, StepFailed
from zarkov.lease import LeaseLost
from zarkov.task import JobFailed, RunContext, TaskError

log = logging.getLogger(__name__)

#: Prefix of the staging collections of every run.
PREFIX = "zstage."


def names(scope: Scope, run_id: str) -> list[str]:
    """Existing staging collections of one run (every attempt)."""
    prefix = f"{PREFIX}{run_id}."
    return [c for c in scope.db.list_collection_names() if c.startswith(prefix)]


def drop(scope: Scope, run_id: str) -> None:
    """Drop every staging collection of one run."""
    for c in names(scope, run_id):
        scope.db.drop_collection(c)


def sweep(scope: Scope, live_run_ids) -> None:
    """Drop staging collections that belong to no run record (left by a crash).

    ``live_run_ids`` is called AFTER the names are listed: a staging collection is
    created only after its run record, so one listed with no record found
    afterwards belongs to a run that is over.
    """
    found = [c for c in scope.db.list_collection_names() if c.startswith(PREFIX)]
    if not found:
        return
    live = live_run_ids()
    for c in found:
        if c[len(PREFIX):].split(".", 1)[0] not in live:
            log.info("dropping leftover staging collection %s", c)
            scope.db.drop_collection(c)


def run_jobs(scope: Scope, agg: Any, task_cls: type, record: dict, attempt: int) -> list[dict]:
    """Run the Task's jobs of one attempt into fresh staging collections; its outputs.

    Each output is ``{kind, target, staging, reduce_text, reduce_name, finalize,
    applied: False}`` (an xmapreduce job gives one per collection it wrote).
    """
    run_id = record["run_id"]
    context = RunContext(run_id, attempt, f"{PREFIX}{run_id}.{attempt}.",
                         on_started=lambda: scope.hook("running"),
                         progress=lambda s: scope.report(f"jobs: {s['phase']}", s["docs"]))
    task = task_cls(agg, scope.config, context)
    sock = client.connect(scope.config)
    try:
        task.run(sock, record["full"])
    except (JobFailed, TaskError, wire.WireError, LeaseLost, PyMongoError):
        raise
    except NotImplementedError:
        raise StepFailed(f"{type(task).__name__}._start_jobs is not implemented",
                         bad_definition=True) from None
    except Exception as e:  # noqa: BLE001 - the user's _start_jobs raised
        raise StepFailed(f"{type(task).__name__}._start_jobs raised {type(e).__name__}: {e}",
                         traceback.format_exc()) from None
    finally:
        sock.close(0)
    return _outputs(scope, context.outputs)


def _outputs(scope: Scope, started: list[dict]) -> list[dict]:
    """One output per (target, staging) pair; every staging collection exists."""
    existing = set(scope.db.list_collection_names())
    outputs: list[dict] = []
    for out in started:
        if out["kind"] == "mr":
            if out["staging"] not in existing:  # a job with no result: still applies
                scope.db.create_collection(out["staging"])
            outputs.append({**out, "applied": False})
        else:  # one output per collection the xmr job wrote
            for c in sorted(x for x in existing if x.startswith(out["staging"])):
                key = c[len(out["staging"]):]
                outputs.append({**out, "target": out["target"] + key, "staging": c,
                                "c": key, "applied": False})
    targets = [o["target"] for o in outputs]
    dup = sorted({t for t in targets if targets.count(t) > 1})
    if dup:
        raise StepFailed(f"several jobs write to {', '.join(dup)}; give each job its own "
                         f"output collection")
    return outputs
