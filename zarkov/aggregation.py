"""One aggregation run from start to finish: the exactly-once logic.

``run(config, name, full=False)`` folds the documents of an AggDef's input collection
that it has not counted yet into its ``zagg.*`` outputs (or recomputes them in full)
so that every document is counted once, whatever gets killed when.  The mechanism is
explained in docs/exactly-once.md; in short:

* a **lease** on the AggDef name (:mod:`zarkov.lease`) makes one process at a time
  the only writer of its run record, its outputs and its marks;
* a **run record** in ``agg_run`` holds the run's state; a run killed at any point
  is finished from that state by the next one, and every step is idempotent;
* jobs write into **staging** collections named after the run and attempt, never into
  the targets; the targets change only in the ``applying`` step, from after-images
  computed beforehand, so applying twice gives the same result as applying once;
* documents gain the AggDef name in ``aggregates`` (``flagging``) only after the
  outputs hold their contribution, and the run record is deleted only after that.

State machine of a run record: ``marking → running → staged → applying → flagging``
then deleted.  Until ``staged`` a failure rolls the run back (marks pulled, staging
dropped); from ``staged`` on it can only go forward.

:class:`_Run` drives a record through these states; the work of each is done by the
helpers of :mod:`zarkov.agg` (marks and flags, staging, merging and applying), and
failures become :class:`AggregationError` in one place, :func:`_error`.

A test hook: ``hook(point)`` is called at each of :data:`PAUSE_POINTS`; by default it
is the one ``ZARKOV_TEST_PAUSE_AT`` asks for (:func:`zarkov.agg.pause_from_env`), with
which kill tests stop ``zcmd aggregate`` at a chosen step and SIGKILL it there.
"""
from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pymongo.errors import PyMongoError

from zarkov import agg_status, model as M, wire
from zarkov.agg import PAUSE_POINTS, Hook, Scope, StepFailed, marks, merge, pause_from_env
from zarkov.agg import records, staging
from zarkov.lease import Lease, LeaseBusy, LeaseLost
from zarkov.task import JobFailed, Task, TaskError

log = logging.getLogger(__name__)

__all__ = ["run", "RunResult", "AggregationError", "BadDefinition", "Busy", "PAUSE_POINTS",
           "load_definition", "load_task_class"]

#: Prefix of the staging collections of every run: ``zstage.<run_id>.<attempt>.<n>``.
STAGING = staging.PREFIX

Progress = Callable[[dict], None]


class AggregationError(Exception):
    """A run that could not be done; ``exit_code`` for zcmd, ``traceback`` if any."""

    exit_code = 1

    def __init__(self, message: str, traceback: Optional[str] = None):
        super().__init__(message)
        self.traceback = traceback


class BadDefinition(AggregationError):
    """Unknown AggDef, or a task_name that is not a usable Task subclass."""

    exit_code = 2


class Busy(AggregationError):
    """Another process is running the same AggDef."""

    exit_code = 3


@dataclass
class RunResult:
    """What one call of :func:`run` did."""

    name: str
    full: bool
    #: Documents the run took (marked, processed, flagged).
    docs: int
    seconds: float
    run_id: str
    #: State of a pending (killed) run that was finished first, if there was one.
    resumed: Optional[str] = None
    #: Target collection -> how it was written (a path of :mod:`zarkov.storage`,
    #: e.g. ``renamed over`` or ``replace-upserts``).
    write_paths: dict = field(default_factory=dict)


# -- validation ------------------------------------------------------------------------
def load_definition(name: str) -> Any:
    """The AggDef called ``name``; BadDefinition listing the known names if none."""
    agg = M.AggDef.by_name(name)
    if agg is None:
        known = M.AggDef.names()
        raise BadDefinition(f"no aggregation definition named '{name}'; known: "
                            + (", ".join(known) if known else "none"))
    return agg


def load_task_class(task_name: str, agg_name: str = "?") -> type:
    """Import the Task subclass at dotted path ``task_name``; BadDefinition if unusable."""
    where = f"aggregation '{agg_name}': task_name '{task_name}'"
    if not task_name or "." not in task_name:
        raise BadDefinition(f"{where} is not a dotted path module.Class")
    module_name, _, class_name = task_name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        raise BadDefinition(f"{where}: cannot import {module_name}: "
                            f"{type(e).__name__}: {e}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise BadDefinition(f"{where}: module {module_name} has no {class_name}")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise BadDefinition(f"{where} is not a subclass of zarkov.task.Task")
    if cls._start_jobs is Task._start_jobs:
        raise BadDefinition(f"{where} does not override _start_jobs(self, socket, full)")
    return cls


# -- errors ----------------------------------------------------------------------------
#: What ends a run before ``staged`` by rolling it back.
_ROLLBACK = (StepFailed, JobFailed, TaskError, wire.WireError)


def _error(name: str, e: BaseException, rolled_back: bool = False) -> AggregationError:
    """The one-line error of ``zcmd aggregate`` for a failure of a run of ``name``."""
    if isinstance(e, AggregationError):
        return e
    tb = getattr(e, "traceback", None)
    if isinstance(e, StepFailed) and e.bad_definition:
        return BadDefinition(f"{name}: {e}", tb)
    if isinstance(e, _ROLLBACK):
        return AggregationError(f"{name}: {e}" + ("; nothing was changed" if rolled_back
                                                  else ""), tb)
    if isinstance(e, LeaseLost):
        return AggregationError(f"{name}: {e}; stopped without touching anything")
    if isinstance(e, PyMongoError):
        return AggregationError(f"{name}: database error: {e}; the next run finishes "
                                f"this one")
    raise e  # a bug: let its traceback through


# -- the driver ------------------------------------------------------------------------
class _Run:
    """Runs of one AggDef, record state by record state, while holding its lease."""

    def __init__(self, scope: Scope, agg: Any, task_cls: type):
        self.s = scope
        self.agg = agg
        self.task_cls = task_cls

    def finish(self, record: dict) -> int:
        """Take a run record from its state to the end; return the documents it took."""
        if record["state"] in ("marking", "running"):
            try:
                if record["state"] == "marking":
                    marks.mark(self.s, record)
                    records.update(self.s, record, {"state": "running"})
                if not record["full"] and record["marked"] == 0:
                    return self.done(record)  # nothing new: no job, nothing to apply
                self.run_jobs(record)
            except _ROLLBACK as e:
                self.abort(record)
                raise _error(self.s.name, e, rolled_back=True) from None
            # Anything else (the lease lost, the database away, a bug) leaves the
            # record for the next run, which finishes or rolls back this one.
        if record["state"] == "staged":
            if not record["full"]:
                for out in record["outputs"]:
                    merge.after_images(self.s, out)
            records.update(self.s, record, {"state": "applying"})
        if record["state"] == "applying":
            for i, out in enumerate(record["outputs"]):
                if not out.get("applied"):
                    merge.apply(self.s, out, record["full"])
                    records.update(self.s, record, {f"outputs.{i}.applied": True})
            records.update(self.s, record, {"state": "flagging"})
        if record["state"] == "flagging":
            marks.flag(self.s, record)
        return self.done(record)

    def run_jobs(self, record: dict) -> None:
        """A new attempt of the Task's jobs into fresh staging; state ``staged``."""
        attempt = record["attempt"] + 1
        self.s.report("jobs: starting", 0)
        staging.drop(self.s, record["run_id"])
        records.update(self.s, record, {"state": "running", "attempt": attempt, "outputs": []})
        outputs = staging.run_jobs(self.s, self.agg, self.task_cls, record, attempt)
        records.update(self.s, record, {"state": "staged", "outputs": outputs})
        self.s.hook("staged")

    def done(self, record: dict) -> int:
        """Record last_run, delete the run record, drop the staging collections."""
        self.s.lease.check()
        self.s.db[M.agg_def.m.collection_name].update_one(
            {"name": self.s.name}, {"$set": {"last_run": record["started"]}})
        records.delete(self.s, record)
        staging.drop(self.s, record["run_id"])
        return int(record["marked"])

    def abort(self, record: dict) -> None:
        """Roll back a run that has not staged its results: unmark, drop, forget."""
        try:
            self.s.lease.check()
            marks.unmark(self.s, record)
            staging.drop(self.s, record["run_id"])
            records.delete(self.s, record)
        except (PyMongoError, LeaseLost) as e:
            # The record stays: the next run finishes or rolls back this one.
            log.error("%s: could not roll back run %s: %s", self.s.name, record["run_id"], e)


def _reporter(progress: Optional[Progress], t0: float) -> Callable[[str, int], None]:
    def report(phase: str, docs: int) -> None:
        if progress is not None:
            progress({"phase": phase, "docs": docs, "elapsed": time.monotonic() - t0})
    return report


def run(config: Any, name: str, full: bool = False, wait: bool = False,
        progress: Optional[Progress] = None, hook: Optional[Hook] = None) -> RunResult:
    """Run the AggDef ``name`` once (incrementally, or a full recompute) exactly once.

    Finishes first a run of the same AggDef that a killed process left pending.
    ``wait``: wait for another process running the same AggDef instead of raising
    Busy.  ``progress`` receives ``{phase, docs, elapsed}`` dicts while it runs.
    ``hook(point)`` is called at each of :data:`PAUSE_POINTS` (default: the test hook
    of ``ZARKOV_TEST_PAUSE_AT``).  Raises AggregationError (BadDefinition, Busy) with
    a one-line message; usable from a gevent process (``zcmd serve``'s real-time
    loop) as from a plain one.  The run's progress, outcome or error is recorded in
    ``agg_status`` for the dashboard (:mod:`zarkov.agg_status`).
    """
    M.configure(config)
    recorder = agg_status.Recorder(M.db(), name, full)
    try:
        result = _run(config, name, full, wait, recorder.progress(progress), hook)
    except Busy:
        raise  # another process's run: its own recorder reports it
    except AggregationError as e:
        recorder.failed(str(e))
        raise
    except Exception as e:
        recorder.failed(f"{type(e).__name__}: {e}")
        raise
    recorder.done(result)
    return result


def _run(config: Any, name: str, full: bool, wait: bool, progress: Optional[Progress],
         hook: Optional[Hook]) -> RunResult:
    """:func:`run` without the status report."""
    t0 = time.monotonic()
    db = M.db()
    agg = load_definition(name)
    task_cls = load_task_class(agg.task_name, name)
    lease = Lease(db.agg_lease, name, config.agg_lease_seconds)
    try:
        lease.acquire(wait=wait)
    except LeaseBusy as e:
        h = e.holder
        raise Busy(f"{name}: already being aggregated by pid {h.get('pid')} on "
                   f"{h.get('host')} (since {h.get('taken')} UTC); try again later, "
                   f"or use --wait") from None
    lease.start_renewing()
    scope = Scope(config, db, name, db[agg.object or "event"], lease, _reporter(progress, t0),
                  hook or pause_from_env())
    try:
        r = _Run(scope, agg, task_cls)
        marks.ensure_indexes(scope)
        staging.sweep(scope, lambda: records.live_run_ids(scope))
        resumed = None
        pending = records.pending(scope)
        if pending is not None:
            resumed = pending["state"]
            log.info("%s: finishing run %s left in state %s", name, pending["run_id"], resumed)
            r.finish(pending)
        docs = 0
        while True:
            record = records.begin(scope, full)
            taken = r.finish(record)
            docs += taken
            # An incremental run takes at most zmr.event_limit documents at a time;
            # go on while a batch was full, so one run leaves nothing behind.
            if full or taken < config.zmr.event_limit:
                break
        return RunResult(name, bool(full), docs, time.monotonic() - t0, record["run_id"],
                         resumed, dict(scope.write_paths))
    except (AggregationError, LeaseLost, PyMongoError, StepFailed) as e:
        raise _error(name, e) from None
    finally:
        try:
            lease.release()
        except PyMongoError:
            pass  # it expires (or the next run on this host sees our pid gone)
