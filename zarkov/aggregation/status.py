"""What each AggDef's runs did, for people: the ``agg_status`` collection.

One document per AggDef name, written by :func:`zarkov.aggregation.run` through a
:class:`Recorder` and read by the web service (``/aggdefs``, the dashboard)::

    {_id: name,
     running:    {started, full, phase, docs, elapsed, updated, pid, host} | null,
     last:       {started, ended, seconds, docs, full, run_id, resumed},
     last_work:  the same, of the last run that took documents (or was full),
     last_error: {at, message, full},
     runs:       {ok, failed, events, seconds_sum, b0..bN}}

``runs`` only grows: runs by outcome, the events incremental runs took, and the
durations of the runs that succeeded by bucket of :data:`~zarkov.histogram.RUN_BOUNDS`
(what ``/metrics`` shows; :func:`runs_of` reads it back).

This is a report, not part of the exactly-once mechanism (that is ``agg_run`` and
``agg_lease``): a write that fails here is logged and the run goes on, and a
``running`` entry left by a killed process is recognised by the lease being gone.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional

from pymongo.database import Database
from pymongo.errors import PyMongoError

from zarkov.histogram import RUN_BOUNDS, bucket
from zarkov.lease import HOST, utcnow

COLLECTION = "agg_status"
#: Seconds between two progress writes of one run (and before the first one: a
#: run that ends sooner, as most real-time runs with nothing new do, costs one write).
PROGRESS_EVERY = 0.5
#: Characters of an error message kept.
MESSAGE_CHARS = 2000

log = logging.getLogger(__name__)


class Recorder:
    """Records one call of ``aggregation.run`` for the AggDef ``name``."""

    def __init__(self, db: Database, name: str, full: bool):
        self.coll = db[COLLECTION]
        self.db = db
        self.name = name
        self.full = bool(full)
        self.started = utcnow()
        self._t0 = time.monotonic()
        self._last_write: Optional[float] = None
        self._running = False

    def progress(self, inner: Optional[Callable[[dict], None]]) -> Callable[[dict], None]:
        """A progress callback that records ``{phase, docs}`` and then calls ``inner``.

        The run reports progress only once it holds the AggDef's lease, so a run that
        finds the AggDef busy never overwrites the holder's ``running`` entry.
        """
        def report(p: dict) -> None:
            now = time.monotonic()
            since = self._last_write if self._last_write is not None else self._t0
            if now - since >= PROGRESS_EVERY:
                self._last_write = now
                self._running = True
                self._set({"running": {
                    "started": self.started, "full": self.full, "phase": str(p.get("phase")),
                    "docs": int(p.get("docs") or 0), "elapsed": round(now - self._t0, 3),
                    "updated": utcnow(), "pid": os.getpid(), "host": HOST}})
            if inner is not None:
                inner(p)
        return report

    def done(self, result: Any) -> None:
        """The run ended well: ``result`` is its RunResult."""
        last = {"started": self.started, "ended": utcnow(), "seconds": round(result.seconds, 3),
                "docs": int(result.docs), "full": self.full, "run_id": result.run_id,
                "resumed": result.resumed}
        fields = {"running": None, "last": last}
        if last["docs"] or self.full:
            # Why apart: the real-time loop's runs that find nothing new would hide it.
            fields["last_work"] = last
        self._set(fields, {"runs.ok": 1, "runs.events": 0 if self.full else last["docs"],
                           "runs.seconds_sum": float(result.seconds),
                           f"runs.b{bucket(RUN_BOUNDS, result.seconds)}": 1})

    def failed(self, message: str) -> None:
        """The run failed with ``message`` (recorded only for a defined AggDef)."""
        try:
            if self.db.agg_def.count_documents({"name": self.name}, limit=1) == 0:
                return
        except PyMongoError:
            return
        self._set({"running": None, "last_error": {
            "at": utcnow(), "message": message[:MESSAGE_CHARS], "full": self.full}},
            {"runs.failed": 1})

    def _set(self, fields: dict, inc: Optional[dict] = None) -> None:
        update: dict[str, Any] = {"$set": fields}
        if inc:
            update["$inc"] = inc
        try:
            self.coll.update_one({"_id": self.name}, update, upsert=True)
        except PyMongoError as e:  # a report must never fail the run
            log.warning("%s: cannot record the run's status in %s: %s", self.name,
                        COLLECTION, e)


def runs_of(status: dict) -> dict[str, Any]:
    """The run counters of one status document: ``{ok, failed, events, seconds}``,
    ``seconds`` a histogram (``{bounds, counts, sum}``) of the successful runs."""
    runs = status.get("runs") if isinstance(status.get("runs"), dict) else {}
    assert isinstance(runs, dict)
    return {"ok": int(runs.get("ok", 0)), "failed": int(runs.get("failed", 0)),
            "events": int(runs.get("events", 0)),
            "seconds": {"bounds": list(RUN_BOUNDS),
                        "counts": [int(runs.get(f"b{i}", 0)) for i in range(len(RUN_BOUNDS) + 1)],
                        "sum": float(runs.get("seconds_sum", 0.0))}}


def read_all(db: Database) -> dict[str, dict]:
    """Every AggDef's status document, by name."""
    return {d["_id"]: d for d in db[COLLECTION].find({}) if isinstance(d.get("_id"), str)}
