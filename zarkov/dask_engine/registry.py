"""Where the Dask engine's jobs can be seen from other processes: the ``dask_job``
collection of the configured database.

Each gateway belongs to one process (a ``zcmd aggregate``, a ``zcmd serve``), so
nobody can ask it for its jobs as one asks the router; instead it writes each job's
summary line (:func:`zarkov.zmr.jobtable.job_summary`, the router's shape) here as
the job goes, at most every :data:`EVERY` seconds a job, and at its end.  The web
service's ``/jobs`` and the dashboard list them beside the router's.  A running job
whose gateway stopped writing for :data:`LOST_AFTER` seconds is shown as ``lost``
(its process was killed).  Finished jobs are deleted after
:data:`~zarkov.zmr.jobtable.KEEP_FINISHED`.

No Dask here: the web service imports this module.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Iterable

from pymongo.database import Database

from zarkov.zmr.jobtable import KEEP_FINISHED, job_summary

COLLECTION = "dask_job"
EVERY = 1.0          # seconds between two writes of one running job's line
HEARTBEAT = 5.0      # a running job's line is written at least this often
LOST_AFTER = 30.0    # a running job not written for this long is lost
PRUNE_EVERY = 60.0   # seconds between two deletions of old lines


class Publisher:
    """Writes the summary lines of one gateway's jobs (see the module docstring)."""

    def __init__(self, db: Database, scheduler: str):
        self.coll = db[COLLECTION]
        self.scheduler = scheduler
        self.where = {"host": socket.gethostname(), "pid": os.getpid()}
        self._written: dict[str, tuple[float, dict]] = {}  # job id -> (when, line)
        self._pruned = 0.0

    def publish(self, jobs: Iterable[Any], now: float | None = None) -> None:
        """Write the lines of ``jobs`` that changed (and are due) or ended."""
        now = time.time() if now is None else now
        for job in jobs:
            when, last = self._written.get(job.job_id, (0.0, None))
            if job.finished and last is not None and last.get("ended") is not None:
                continue  # its last line is written
            line = job_summary(job)
            due = now - when >= (EVERY if line != last else HEARTBEAT)
            if not (due or job.finished):
                continue
            doc = {**line, "engine": "dask", "scheduler": self.scheduler,
                   "gateway": self.where, "seen": now}
            self.coll.replace_one({"_id": job.job_id}, doc, upsert=True)
            self._written[job.job_id] = (now, line)
        if now - self._pruned > PRUNE_EVERY:
            self._pruned = now
            self.coll.delete_many({"ended": {"$lt": now - KEEP_FINISHED}})
            live = {j.job_id for j in jobs} if isinstance(jobs, (list, tuple, set)) else None
            if live is not None:
                for job_id in [k for k in self._written if k not in live]:
                    del self._written[job_id]


def read(db: Database, recent: int = 20, now: float | None = None) -> list[dict]:
    """The lines of the running jobs, then of the ``recent`` last finished, newest
    first; a running job whose gateway went silent is in state ``lost``."""
    now = time.time() if now is None else now
    coll = db[COLLECTION]
    running = list(coll.find({"ended": None}).sort("created", -1).limit(1000))
    finished = list(coll.find({"ended": {"$ne": None}}).sort("ended", -1).limit(recent))
    for line in running:
        if now - float(line.get("seen") or 0) > LOST_AFTER:
            line["state"] = line["phase"] = "lost"
            line["error"] = (f"its gateway (pid {line.get('gateway', {}).get('pid')} on "
                             f"{line.get('gateway', {}).get('host')}) stopped reporting")
    out = running + finished
    for line in out:
        line["job_id"] = line.pop("_id")
    return out
