"""The jobs an engine knows, as both engines (the router, the Dask gateway) keep and
show them: the table, how long a finished job stays in it, and a job's summary line
in the ``jobs`` list of ``status`` (README, "The map-reduce protocol").

No gevent and no Dask here: the router runs under gevent, the gateway must not.
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Protocol

from zarkov.oneline import short_repr
from zarkov.zmr import jobspec

INLINE = "inline"          # write_path of an output handed back in the status
KEEP_FINISHED = 3600.0     # seconds a finished job's status stays available
MAX_FINISHED = 1000        # finished jobs remembered at most
RECENT_JOBS = 20           # finished jobs listed by ``status`` without a job id
KEEP_INLINE = 60.0         # seconds a finished job's inline output stays available
SUMMARY_COUNTS = ("docs_read", "chunks_done", "chunks_total", "partitions_done",
                  "partitions_total", "docs_written", "docs_inline")


class KnownJob(Protocol):
    """What the table needs of a job (:class:`zarkov.zmr.job.Job`, the Dask engine's)."""

    job_id: str
    spec: Any
    created: float
    started: Optional[float]
    ended: Optional[float]

    @property
    def finished(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    def drop_inline(self) -> None: ...


def job_summary(job: KnownJob) -> dict[str, Any]:
    """One line of the ``jobs`` list of ``status``: what the job is and how far it got."""
    st = job.status()
    out = {"job_id": job.job_id, "kind": job.spec.kind, "database": job.spec.database,
           "input": list(job.spec.input_names), "output": job.spec.output_name,
           "created": job.created, "started": job.started, "ended": job.ended}
    for key in ("state", "phase", "elapsed", "engine", "write_path", *SUMMARY_COUNTS):
        if key in st:
            out[key] = st[key]
    if st.get("traceback"):
        out["error"] = st["traceback"].strip().splitlines()[-1][:300]
    return out


class JobTable:
    """The running and recently finished jobs of one engine, by id."""

    def __init__(self) -> None:
        self.jobs: dict[str, Any] = {}
        #: Jobs finished since the engine started, by final state (``complete``/``error``).
        self.finished: dict[str, int] = {}
        self._tallied: set[str] = set()

    def tally(self) -> dict[str, int]:
        """Count the jobs that finished since the last look; ``finished`` after it."""
        for job in self.jobs.values():
            if job.finished and job.job_id not in self._tallied:
                self._tallied.add(job.job_id)
                state = str(job.status().get("state"))
                self.finished[state] = self.finished.get(state, 0) + 1
        return dict(self.finished)

    def by_state(self) -> dict[str, int]:
        """The jobs known now (running or kept after they finished), by state."""
        out: dict[str, int] = {}
        for job in self.jobs.values():
            state = str(job.status().get("state"))
            out[state] = out.get(state, 0) + 1
        return out

    def add(self, job: KnownJob) -> None:
        """Know ``job`` from now on."""
        self.jobs[job.job_id] = job

    def get(self, job_id: Any) -> Any:
        """The job of ``job_id``, or None (a job id is a string)."""
        # Why type() and not isinstance: bson's Code is an unhashable str subclass.
        return self.jobs.get(job_id) if type(job_id) is str else None

    def running(self) -> list[Any]:
        """The jobs that have not ended."""
        return [j for j in self.jobs.values() if not j.finished]

    def prune(self, now: Optional[float] = None) -> None:
        """Forget finished jobs past :data:`KEEP_FINISHED` (or beyond
        :data:`MAX_FINISHED`), and inline outputs nobody fetched in time."""
        now = time.time() if now is None else now
        self.tally()  # before any finished job is forgotten
        done = sorted((j for j in self.jobs.values() if j.finished),
                      key=lambda j: j.ended or now)
        for i, job in enumerate(done):
            age = now - (job.ended or now)
            if age > KEEP_FINISHED or len(done) - i > MAX_FINISHED:
                del self.jobs[job.job_id]
                self._tallied.discard(job.job_id)
            elif age > KEEP_INLINE:
                job.drop_inline()

    def recent(self, request: Mapping[str, Any]) -> list[dict]:
        """Summaries of the running jobs, then of the ``recent`` (default 20) last
        finished, newest first."""
        recent = request.get("recent", RECENT_JOBS)
        if not isinstance(recent, int) or isinstance(recent, bool) or recent < 0:
            recent = RECENT_JOBS
        jobs = sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)
        running = [j for j in jobs if not j.finished]
        finished = [j for j in jobs if j.finished][:min(recent, MAX_FINISHED)]
        return [job_summary(j) for j in running + finished]

    def status_reply(self, request: Mapping[str, Any]) -> tuple[Optional[dict], Any, float]:
        """``status`` of the job ``request`` names: (the reply now, the job, 0), or
        (None, the job, seconds) when the reply waits up to that long for its end."""
        job_id = request["job_id"]
        job = self.get(job_id)
        if job is None:
            return ({"job_id": job_id, "status": {"state": "UNKNOWN"},
                     "error": f"unknown job id {short_repr(job_id)}"}, None, 0.0)
        try:
            wait = jobspec.status_wait(request)
        except jobspec.BadRequest as e:
            return {"job_id": job.job_id, "status": job.status(), "error": f"status: {e}"}, job, 0.0
        if wait and not job.finished:
            # A long poll: the client learns that the job ended at once, not at its
            # next poll, and asks less often while it runs.
            return None, job, float(wait)
        return {"job_id": job.job_id, "status": job.status()}, job, 0.0
