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

A test hook: when the environment variable ``ZARKOV_TEST_PAUSE_AT`` names one of
:data:`PAUSE_POINTS`, the run prints ``zarkov-test-pause <point>`` on stderr at that
point and sleeps until killed, so kill tests can hit each step deterministically.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

from pymongo import ReplaceOne, UpdateOne
from pymongo.database import Database
from pymongo.errors import OperationFailure, PyMongoError

from zarkov import functions, model as M, security, wire
from zarkov.lease import HOST, Lease, LeaseBusy, LeaseLost, utcnow
from zarkov.task import JobFailed, RunContext, Task, TaskError
from zarkov.zmr.partition import group_key

log = logging.getLogger(__name__)

#: Prefix of the staging collections of every run: ``zstage.<run_id>.<attempt>.<n>``.
STAGING = "zstage."
#: Documents per batch of marks, flags, after-images and applied writes.  Below 100:
#: FerretDB 1.24 stalls on a bulk write of 100 or more updates.
BATCH = 50
#: Where ZARKOV_TEST_PAUSE_AT can stop a run (see the module docstring).
PAUSE_POINTS = ("marking", "running", "staged", "applying", "flagging")

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


def _pause(point: str) -> None:
    """Test hook: stop here until killed when ZARKOV_TEST_PAUSE_AT names ``point``."""
    if os.environ.get("ZARKOV_TEST_PAUSE_AT") == point:
        print(f"zarkov-test-pause {point}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def _batches(items: Iterable[Any], size: int = BATCH) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


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


# -- one run -------------------------------------------------------------------------
class _Run:
    """The steps of runs of one AggDef, done while holding its lease."""

    def __init__(self, config: Any, db: Database, agg: Any, task_cls: type, lease: Lease,
                 progress: Optional[Progress]):
        self.config = config
        self.db = db
        self.agg = agg
        self.name: str = agg.name
        self.task_cls = task_cls
        self.lease = lease
        self.progress = progress
        self.events = db[agg.object or "event"]
        self.runs = db.agg_run
        self.t0 = time.monotonic()

    # -- bookkeeping ---------------------------------------------------------------
    def _report(self, phase: str, docs: int = 0) -> None:
        if self.progress is not None:
            self.progress({"phase": phase, "docs": docs,
                           "elapsed": time.monotonic() - self.t0})

    def _update(self, record: dict, changes: dict) -> None:
        """Write our own run record; it must still be ours (lease held, same run)."""
        self.lease.check()
        res = self.runs.update_one({"_id": self.name, "run_id": record["run_id"]},
                                   {"$set": changes})
        if res.matched_count != 1:
            raise LeaseLost(f"run record of '{self.name}' changed under us")
        record.update(changes)

    def _object_lock(self) -> Lease:
        """A lease on the input collection for writing marks and flags.

        FerretDB updates documents by read-modify-write without a lock, so two runs of
        different AggDefs updating ``jobs``/``aggregates`` of the same events at once
        could lose one's change.  Serialising those short write phases per input
        collection avoids it (on MongoDB it only costs a little waiting).
        """
        lock = Lease(self.db.agg_lease, {"object": self.events.name},
                     self.config.agg_lease_seconds)
        lock.acquire(wait=True)
        lock.start_renewing()
        return lock

    def staging_names(self, run_id: str) -> list[str]:
        """Existing staging collections of one run (every attempt)."""
        prefix = f"{STAGING}{run_id}."
        return [c for c in self.db.list_collection_names() if c.startswith(prefix)]

    def drop_staging(self, run_id: str) -> None:
        """Drop every staging collection of one run."""
        for c in self.staging_names(run_id):
            self.db.drop_collection(c)

    def sweep_staging(self) -> None:
        """Drop staging collections that belong to no run record (left by a crash).

        Names are listed BEFORE records are read: a staging collection is created
        only after its run record, so one listed with no record found afterwards
        belongs to a run that is over.
        """
        names = [c for c in self.db.list_collection_names() if c.startswith(STAGING)]
        if not names:
            return
        live = {r["run_id"] for r in self.runs.find({}, {"run_id": 1})}
        for c in names:
            run_id = c[len(STAGING):].split(".", 1)[0]
            if run_id not in live:
                log.info("dropping leftover staging collection %s", c)
                self.db.drop_collection(c)

    def ensure_indexes(self) -> None:
        """Indexes that let runs select new and marked documents without a scan."""
        self.events.create_index("aggregates")
        self.events.create_index("jobs")

    # -- the state machine ---------------------------------------------------------
    def begin(self, full: bool) -> dict:
        """Create the run record of a new run (state ``marking``)."""
        record = {"_id": self.name, "run_id": uuid.uuid4().hex, "full": bool(full),
                  "attempt": 0, "state": "marking", "started": utcnow(), "marked": 0,
                  "host": HOST, "pid": os.getpid(), "outputs": []}
        self.lease.check()
        self.runs.insert_one(record)
        return record

    def finish(self, record: dict) -> int:
        """Take a run record from its state to the end; return the documents it took."""
        if record["state"] in ("marking", "running"):
            try:
                if record["state"] == "marking":
                    self.mark(record)
                if not record["full"] and record["marked"] == 0:
                    # Nothing new: no job to run, nothing to apply or flag.
                    self.done(record)
                    return 0
                self.run_jobs(record)
            except LeaseLost:
                raise  # the run is someone else's now: touch nothing
            except AggregationError:
                self.abort(record)
                raise
            except (JobFailed, TaskError, wire.WireError) as e:
                self.abort(record)
                raise AggregationError(f"{self.name}: {e}; nothing was changed",
                                       getattr(e, "traceback", None)) from None
            # Anything else (the database away, a bug) leaves the record for the
            # next run, which finishes or rolls back this one.
        if record["state"] == "staged":
            self.prepare(record)
        if record["state"] == "applying":
            self.apply(record)
        if record["state"] == "flagging":
            self.flag(record)
        return self.done(record)

    def mark(self, record: dict) -> None:
        """Add the run id to the ``jobs`` of the documents this run takes.

        Incremental: documents whose ``aggregates`` lacks the name, at most
        ``zmr.event_limit``, marked by ``_id`` in batches; ``marked`` is raised before
        each batch is written, so it never undercounts (0 means nothing was ever
        marked).  Full: every document, in one statement.  Both resume: documents
        already marked are skipped, marking twice changes nothing.
        """
        run_id = record["run_id"]
        self._report("marking", record["marked"])
        with self._object_lock():
            if record["full"]:
                self.events.update_many({"jobs": {"$ne": run_id}},
                                        {"$addToSet": {"jobs": run_id}})
                self._update(record, {"marked": self.events.count_documents({"jobs": run_id})})
                self._report("marking", record["marked"])
                _pause("marking")
            else:
                remaining = self.config.zmr.event_limit - record["marked"]
                if remaining > 0:
                    # Read every id before writing: on FerretDB a multi-document
                    # write waits for open cursors on the same collection to close.
                    ids = [d["_id"] for d in self.events.find(
                        {"aggregates": {"$ne": self.name}, "jobs": {"$ne": run_id}},
                        {"_id": 1}).limit(remaining)]
                    self._write_by_id(ids, {"$addToSet": {"jobs": run_id}}, "marking",
                                      record)
        self._update(record, {"state": "running"})

    def _write_by_id(self, ids: list, update: dict, phase: str,
                     record: Optional[dict] = None) -> int:
        """Apply ``update`` to documents ``ids`` in batches of single-document updates.

        By ``_id`` because FerretDB pushes only ``_id`` equality down to storage.  With
        ``record``, its ``marked`` count is raised before each batch is written.
        """
        n = 0
        for batch in _batches(ids):
            self.lease.check()
            if record is not None:
                self._update(record, {"marked": record["marked"] + len(batch)})
            self.events.bulk_write([UpdateOne({"_id": i}, update) for i in batch],
                                   ordered=False)
            n += len(batch)
            self._report(phase, n)
            _pause(phase)
        return n

    def run_jobs(self, record: dict) -> None:
        """Run the Task's jobs into fresh staging collections; state ``staged``."""
        run_id = record["run_id"]
        attempt = record["attempt"] + 1
        # A new attempt never reuses names: jobs of a killed attempt that are still
        # running in the router can only write to collections nobody will read.
        self._report("jobs: starting")
        self.drop_staging(run_id)
        self._update(record, {"state": "running", "attempt": attempt, "outputs": []})
        context = RunContext(run_id, attempt, f"{STAGING}{run_id}.{attempt}.",
                             on_started=lambda: _pause("running"),
                             progress=lambda s: self._report(f"jobs: {s['phase']}",
                                                             s["docs"]))
        task = self.task_cls(self.agg, self.config, context)
        sock = wire.req_socket(self.config.zmr.req_uri, keys=security.client_keys(self.config))
        try:
            task.run(sock, record["full"])
        except (JobFailed, TaskError, wire.WireError, LeaseLost, PyMongoError):
            raise
        except NotImplementedError:
            raise BadDefinition(f"{self.name}: {type(task).__name__}._start_jobs "
                                f"is not implemented") from None
        except Exception as e:  # noqa: BLE001 - the user's _start_jobs raised
            raise AggregationError(
                f"{self.name}: {type(task).__name__}._start_jobs raised "
                f"{type(e).__name__}: {e}; nothing was changed",
                traceback.format_exc()) from None
        finally:
            sock.close(0)
        outputs = self._resolve_outputs(context.outputs)
        self._update(record, {"state": "staged", "outputs": outputs})
        _pause("staged")

    def _resolve_outputs(self, started: list[dict]) -> list[dict]:
        """One output per (target, staging) pair; staging collections all exist."""
        existing = set(self.db.list_collection_names())
        outputs: list[dict] = []
        for out in started:
            if out["kind"] == "mr":
                if out["staging"] not in existing:  # a job with no result: still applies
                    self.db.create_collection(out["staging"])
                outputs.append({**out, "applied": False})
            else:  # one output per collection the xmr job wrote
                for c in sorted(x for x in existing if x.startswith(out["staging"])):
                    key = c[len(out["staging"]):]
                    outputs.append({**out, "target": out["target"] + key, "staging": c,
                                    "c": key, "applied": False})
        targets = [o["target"] for o in outputs]
        dup = {t for t in targets if targets.count(t) > 1}
        if dup:
            raise AggregationError(f"{self.name}: several jobs write to {', '.join(sorted(dup))}"
                                   f"; give each job its own output collection")
        return outputs

    def prepare(self, record: dict) -> None:
        """Incremental: compute each target's after-images into ``<staging>.after``.

        The new value of a key is ``reduce(key, [old, staged])`` where the target has
        the key, else the staged value.  Nothing is written to a target here, so an
        interrupted prepare simply starts again from scratch.
        """
        if not record["full"]:
            for out in record["outputs"]:
                self._after_images(out)
        self._update(record, {"state": "applying"})

    def _after_images(self, out: dict) -> None:
        self._report(f"merging {out['target']}")
        after = self.db[out["staging"] + ".after"]
        after.drop()
        reduce = functions.load(out["reduce_text"], out["reduce_name"], "reduce")
        staged = self.db[out["staging"]]
        target = self.db[out["target"]]
        n = 0
        # Lists, not cursors: see mark() about FerretDB and open cursors.
        for docs in _batches(list(staged.find({}))):
            keys = [d["_id"] for d in docs]
            old = {group_key(d["_id"]): d for d in target.find({"_id": {"$in": keys}})}
            images = []
            for d in docs:
                prev = old.get(group_key(d["_id"]))
                if prev is None:
                    images.append(d)
                    continue
                try:
                    if out["kind"] == "xmr":
                        value = reduce(out["c"], d["_id"], [prev.get("value"), d.get("value")])
                    else:
                        value = reduce(d["_id"], [prev.get("value"), d.get("value")])
                except Exception as e:  # noqa: BLE001 - the user's reduce
                    raise AggregationError(
                        f"{self.name}: reduce '{out['reduce_name']}' raised {type(e).__name__}: "
                        f"{e} while merging into {out['target']}", traceback.format_exc()
                    ) from None
                images.append({**prev, "value": value})
            after.insert_many(images, ordered=False)
            n += len(images)
            self._report(f"merging {out['target']}", n)

    def apply(self, record: dict) -> None:
        """Write the staged results into the targets; idempotent; state ``flagging``."""
        for i, out in enumerate(record["outputs"]):
            if out.get("applied"):
                continue
            self._report(f"applying {out['target']}")
            if record["full"]:
                self._replace(out)
            else:
                self._upsert(out)
            self._update(record, {f"outputs.{i}.applied": True})
        self._update(record, {"state": "flagging"})

    def _replace(self, out: dict) -> None:
        """Full run: the staging collection becomes the target.

        On MongoDB a rename over the target does it in one step.  FerretDB 1.24
        implements neither ``dropTarget`` nor renaming collections whose names contain
        a dot (``zagg.*``), so there the target is dropped and the staging documents
        copied into it; the staging collection is dropped last, so a kill anywhere in
        between makes the next run copy again (readers may see the target empty or
        partly filled meanwhile).  A missing staging collection means: applied.
        """
        if out["staging"] not in self.db.list_collection_names():
            return
        staging = self.db[out["staging"]]
        try:
            staging.rename(out["target"], dropTarget=True)
        except OperationFailure as e:
            log.debug("rename %s -> %s refused (%s): copying", out["staging"],
                      out["target"], e)
            self.db.drop_collection(out["target"])
            _pause("applying")
            target = self.db[out["target"]]
            n = 0
            # Reading the staging collection while inserting into another one is
            # safe on FerretDB (only multi-document updates wait for cursors).
            for docs in _batches(staging.find({}), 5000):
                target.insert_many(docs, ordered=False)
                n += len(docs)
                self._report(f"copying into {out['target']}", n)
            if n == 0:
                self.db.create_collection(out["target"])
            staging.drop()
        self._report(f"replaced {out['target']}")
        _pause("applying")

    def _upsert(self, out: dict) -> None:
        """Incremental run: replace each changed target document by its after-image."""
        after = self.db[out["staging"] + ".after"]
        target = self.db[out["target"]]
        n = 0
        for docs in _batches(list(after.find({}))):
            target.bulk_write([ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs],
                              ordered=False)
            n += len(docs)
            self._report(f"applying {out['target']}", n)
            _pause("applying")

    def flag(self, record: dict) -> None:
        """Give the run's documents the AggDef name and take the run id off them."""
        run_id = record["run_id"]
        self._unmark(record, {"$addToSet": {"aggregates": self.name},
                              "$pull": {"jobs": run_id}}, "flagging")

    def _unmark(self, record: dict, update: dict, phase: str) -> None:
        """Apply ``update`` to every document marked with the run id (idempotent)."""
        run_id = record["run_id"]
        self._report(phase)
        with self._object_lock():
            if record["full"]:
                self.events.update_many({"jobs": run_id}, update)
                self._report(phase)
                _pause(phase)
            else:
                ids = [d["_id"] for d in self.events.find({"jobs": run_id}, {"_id": 1})]
                self._write_by_id(ids, update, phase)

    def done(self, record: dict) -> int:
        """Record last_run, delete the run record, drop the staging collections."""
        self.lease.check()
        self.db[M.agg_def.m.collection_name].update_one(
            {"name": self.name}, {"$set": {"last_run": record["started"]}})
        self.runs.delete_one({"_id": self.name, "run_id": record["run_id"]})
        self.drop_staging(record["run_id"])
        return int(record["marked"])

    def abort(self, record: dict) -> None:
        """Roll back a run that has not staged its results: unmark, drop, forget."""
        try:
            self.lease.check()
            self._unmark(record, {"$pull": {"jobs": record["run_id"]}}, "rollback")
            self.drop_staging(record["run_id"])
            self.runs.delete_one({"_id": self.name, "run_id": record["run_id"]})
        except (PyMongoError, LeaseLost) as e:
            # The record stays: the next run finishes or rolls back this one.
            log.error("%s: could not roll back run %s: %s", self.name, record["run_id"], e)


def run(config: Any, name: str, full: bool = False, wait: bool = False,
        progress: Optional[Progress] = None) -> RunResult:
    """Run the AggDef ``name`` once (incrementally, or a full recompute) exactly once.

    Finishes first a run of the same AggDef that a killed process left pending.
    ``wait``: wait for another process running the same AggDef instead of raising
    Busy.  ``progress`` receives ``{phase, docs, elapsed}`` dicts while it runs.
    Raises AggregationError (BadDefinition, Busy) with a one-line message; usable
    from a gevent process (``zcmd serve``'s real-time loop) as from a plain one.
    """
    t0 = time.monotonic()
    M.configure(config)
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
    try:
        r = _Run(config, db, agg, task_cls, lease, progress)
        r.ensure_indexes()
        r.sweep_staging()
        resumed = None
        pending = db.agg_run.find_one({"_id": name})
        if pending is not None:
            resumed = pending["state"]
            log.info("%s: finishing run %s left in state %s", name, pending["run_id"],
                     resumed)
            r.finish(pending)
        docs = 0
        while True:
            record = r.begin(full)
            taken = r.finish(record)
            docs += taken
            # An incremental run takes at most zmr.event_limit documents at a time;
            # go on while a batch was full, so one run leaves nothing behind.
            if full or taken < config.zmr.event_limit:
                break
        return RunResult(name, bool(full), docs, time.monotonic() - t0, record["run_id"],
                         resumed)
    except LeaseLost as e:
        raise AggregationError(f"{name}: {e}; stopped without touching anything") from None
    except PyMongoError as e:
        raise AggregationError(f"{name}: database error: {e}; the next run finishes "
                               f"this one") from None
    finally:
        try:
            lease.release()
        except PyMongoError:
            pass  # it expires (or the next run on this host sees our pid gone)
