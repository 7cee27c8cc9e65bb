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
helpers of :mod:`zarkov.aggregation` (marks and flags, staging, merging and applying), and
failures become :class:`AggregationError` in one place, :func:`_error`.

A test hook: ``hook(point)`` is called at each of :data:`PAUSE_POINTS`; by default it
is the one ``ZARKOV_TEST_PAUSE_AT`` asks for (:func:`zarkov.aggregation.scope.pause_from_env`), with
which kill tests stop ``zcmd aggregate`` at a chosen step and SIGKILL it there.
"""
from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pymongo.errors import PyMongoError

from zarkov import model as M
from zarkov import wire
from zarkov.aggregation import marks, merge, records, staging
from zarkov.aggregation import positions as agg_positions
from zarkov.aggregation import status as agg_status
from zarkov.aggregation.scope import PAUSE_POINTS, Hook, Scope, StepFailed, pause_from_env
from zarkov.errors import EXIT_BUSY, EXIT_USAGE, ZarkovError
from zarkov.eventlog.rotate import chain
from zarkov.lease import Lease, LeaseBusy, LeaseLost, utcnow
from zarkov.task import JobFailed, Task, TaskError

log = logging.getLogger(__name__)

__all__ = ["run", "RunResult", "AggregationError", "BadDefinition", "Busy", "PAUSE_POINTS",
           "load_definition", "load_task_class"]

#: Prefix of the staging collections of every run: ``zstage.<run_id>.<attempt>.<n>``.
STAGING = staging.PREFIX

Progress = Callable[[dict], None]


class AggregationError(ZarkovError):
    """A run that could not be done (``exit_code`` 1), ``traceback`` if any."""


class BadDefinition(AggregationError):
    """Unknown AggDef, or a task_name that is not a usable Task subclass."""

    exit_code = EXIT_USAGE


class Busy(AggregationError):
    """Another process is running the same AggDef."""

    exit_code = EXIT_BUSY


@dataclass
class RunResult:
    """What one call of :func:`run` did."""

    name: str
    full: bool
    #: Documents the run took (marked, processed, flagged).
    docs: int
    seconds: float
    #: The run's id (the last one's, when it took several batches); None when an
    #: incremental run found nothing new (it creates no run record).
    run_id: Optional[str]
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
        #: (run id, ids) of the documents this process marked, all of them, for the
        #: run being finished: flagging them needs no search.
        self.marked: tuple[str, marks.Ids] = ("", {})

    def _marked_ids(self, record: dict) -> Optional[marks.Ids]:
        run_id, ids = self.marked
        return ids if run_id == record["run_id"] else None

    def finish(self, record: dict, ids: Optional[marks.Ids] = None, fresh: bool = False,
               resumed: bool = False) -> int:
        """Take a run record from its state to the end; return the documents it took.

        ``fresh``: the record was just created by this process (``ids``: the
        documents without a position an incremental run marks); ``resumed``: it was
        left by a killed run.
        """
        if record["state"] in ("marking", "running"):
            try:
                marked = None
                if record["state"] == "marking":
                    if record["full"] or record["marked"] or not fresh:
                        marked, done_ids = marks.mark(self.s, record, ids, fresh)
                        if done_ids is not None:
                            self.marked = (record["run_id"], done_ids)
                    else:  # positions alone: nothing to mark
                        marked = 0
                        self.s.hook("marking")
                    if not record["full"] and marked == 0 and not records.ranges(record):
                        record["marked"] = 0
                        return self.done(record, resumed)  # nothing new: no job
                elif (not record["full"] and record["marked"] == 0
                      and not records.ranges(record)):
                    return self.done(record, resumed)
                self.run_jobs(record, marked)
            except _ROLLBACK as e:
                self.abort(record)
                raise _error(self.s.name, e, rolled_back=True) from None
            # Anything else (the lease lost, the database away, a bug) leaves the
            # record for the next run, which finishes or rolls back this one.
        if record["state"] == "staged":
            changes: dict = {"state": "applying"}
            if not record["full"]:
                for out in record["outputs"]:
                    after = merge.after_images(self.s, out, _room(record))
                    out.pop("after", None)
                    if after is not None:
                        out["after"] = after
                changes["outputs"] = record["outputs"]
            records.update(self.s, record, changes)
        if record["state"] == "applying":
            outputs = record["outputs"]
            for i, out in enumerate(outputs):
                if not out.get("applied"):
                    merge.apply(self.s, out, record["full"])
                    if i < len(outputs) - 1:  # the last one: the state says it
                        records.update(self.s, record, {f"outputs.{i}.applied": True})
            records.update(self.s, record, {"state": "flagging"})
        if record["state"] == "flagging":
            marks.flag(self.s, record, self._marked_ids(record))
            agg_positions.advance(self.s, records.ranges(record), record.get("swept"))
        return self.done(record, resumed)

    def run_jobs(self, record: dict, marked: Optional[int] = None) -> None:
        """A new attempt of the Task's jobs into fresh staging; state ``staged``.

        ``marked``: the count of marks, when marking just ended (recorded with the
        state ``running``, in the same write).
        """
        attempt = record["attempt"] + 1
        self.s.report("jobs: starting", 0)
        if attempt > 1:  # what the killed attempts left
            staging.drop(self.s, record["run_id"])
        changes = {"state": "running", "attempt": attempt, "outputs": []}
        if marked is not None:
            changes["marked"] = marked
        records.update(self.s, record, changes)
        outputs, read = staging.run_jobs(self.s, self.agg, self.task_cls, record, attempt)
        records.update(self.s, record, {"state": "staged", "outputs": outputs,
                                        "docs_read": read})
        self.s.hook("staged")

    def done(self, record: dict, resumed: bool = False) -> int:
        """Record last_run, delete the run record, drop the staging collections (if
        the run made any); return the documents the run took."""
        self.s.report("finishing", int(record["marked"]))
        self.s.lease.check()
        self.s.db[M.agg_def.m.collection_name].update_one(
            {"name": self.s.name}, {"$set": {"last_run": record["started"]}})
        records.delete(self.s, record)
        if resumed or _made_collections(record):
            staging.drop(self.s, record["run_id"])
        if record["full"]:
            # What the jobs read: every position, the marked documents and those
            # counted before.
            return int(record.get("docs_read") or record["marked"])
        return int(record["marked"]) + records.positioned(record)

    def abort(self, record: dict) -> None:
        """Roll back a run that has not staged its results: unmark, drop, forget."""
        try:
            self.s.lease.check()
            marks.unmark(self.s, record, self._marked_ids(record))
            staging.drop(self.s, record["run_id"])
            records.delete(self.s, record)
        except (PyMongoError, LeaseLost) as e:
            # The record stays: the next run finishes or rolls back this one.
            log.error("%s: could not roll back run %s: %s", self.s.name, record["run_id"], e)


def _room(record: dict) -> int:
    """Bytes of after-images the record may still take in."""
    used = sum(len(o.get("inline") or b"") + len(o.get("after") or b"")
               for o in record["outputs"])
    return max(0, min(staging.INLINE_MAX, staging.RECORD_BUDGET - used))


def _made_collections(record: dict) -> bool:
    """Whether the run may have created staging collections (else none to drop)."""
    if record["full"] or record["attempt"] > 1:
        return True
    return any("inline" not in o or "after" not in o for o in record["outputs"])


def _sweeps(scope: Scope, sweep: Optional[bool], full: bool) -> bool:
    """Whether this run looks for events without a position (see :func:`run`)."""
    if full or sweep or scope.writes.caps.indexed_filters:
        return True
    if sweep is False:
        return False
    last = agg_positions.last_sweep(scope)
    return last is None or (utcnow() - last).total_seconds() >= scope.config.sweep_interval


def _reporter(progress: Optional[Progress], t0: float) -> Callable[[str, int], None]:
    def report(phase: str, docs: int) -> None:
        if progress is not None:
            progress({"phase": phase, "docs": docs, "elapsed": time.monotonic() - t0})
    return report


def run(config: Any, name: str, full: bool = False, wait: bool = False,
        progress: Optional[Progress] = None, hook: Optional[Hook] = None,
        sweep: Optional[bool] = None) -> RunResult:
    """Run the AggDef ``name`` once (incrementally, or a full recompute) exactly once.

    Finishes first a run of the same AggDef that a killed process left pending.
    ``wait``: wait for another process running the same AggDef instead of raising
    Busy.  The positions the event logger gave are always taken; ``sweep``: also
    look for events without a position (written by other programs) — True: now;
    False: not (unless an index finds them cheaply); None: when ``sweep_interval``
    has passed since the AggDef's last sweep (on MongoDB: always), since where the
    server has no index for that search it reads the whole input.  A full run
    always sweeps.  ``progress`` receives ``{phase, docs, elapsed}`` dicts while it
    runs.
    ``hook(point)`` is called at each of :data:`PAUSE_POINTS` (default: the test hook
    of ``ZARKOV_TEST_PAUSE_AT``).  Raises AggregationError (BadDefinition, Busy) with
    a one-line message; usable from a gevent process (``zcmd serve``'s real-time
    loop) as from a plain one.  The run's progress, outcome or error is recorded in
    ``agg_status`` for the dashboard (:mod:`zarkov.aggregation.status`).
    """
    M.configure(config)
    recorder = agg_status.Recorder(M.db(), name, full)
    try:
        result = _run(config, name, full, wait, recorder.progress(progress), hook, sweep)
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
         hook: Optional[Hook], sweep: Optional[bool] = None) -> RunResult:
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
        scope.inputs = chain(db, scope.events.name, config.num_event_logs)
        scope.sweep = _sweeps(scope, sweep, full)
        r = _Run(scope, agg, task_cls)
        marks.ensure_indexes(scope)
        staging.sweep(scope, lambda: records.live_run_ids(scope))
        resumed = None
        pending = records.pending(scope)
        if pending is not None:
            resumed = pending["state"]
            log.info("%s: finishing run %s left in state %s", name, pending["run_id"], resumed)
            r.finish(pending, resumed=True)
        docs = 0
        run_id = None
        while True:
            if full:
                record = records.begin(scope, True, ranges=agg_positions.all_ranges(scope))
                taken = r.finish(record, fresh=True)
            else:
                # The documents to take are chosen before the run record exists, so
                # that a run with nothing new writes nothing but last_run.
                started = utcnow()
                scope.report("selecting", 0)
                limit = config.zmr.event_limit
                ranges = agg_positions.new_ranges(scope, limit)
                room = limit - sum(map(len, ranges))
                ids = marks.candidates(scope, room) if scope.sweep and room > 0 else {}
                swept = started if scope.sweep else None
                if not ranges and not ids:
                    if run_id is None:
                        lease.check()
                        db[M.agg_def.m.collection_name].update_one(
                            {"name": name}, {"$set": {"last_run": started}})
                        agg_positions.advance(scope, [], swept)
                    break
                record = records.begin(scope, False, marked=marks.count(ids), ranges=ranges,
                                       swept=swept)
                taken = r.finish(record, ids, fresh=True)
            run_id = record["run_id"]
            docs += taken
            # An incremental run takes at most zmr.event_limit documents at a time;
            # go on while a batch was full, so one run leaves nothing behind.
            if full or taken < config.zmr.event_limit:
                break
        return RunResult(name, bool(full), docs, time.monotonic() - t0, run_id,
                         resumed, dict(scope.write_paths))
    except (AggregationError, LeaseLost, PyMongoError, StepFailed) as e:
        raise _error(name, e) from None
    finally:
        try:
            lease.release()
        except PyMongoError:
            pass  # it expires (or the next run on this host sees our pid gone)
