"""What a job of any engine keeps and reports: its phases, counters and status.

The router's :class:`zarkov.zmr.job.Job` and the Dask gateway's
:class:`zarkov.dask_engine.job.DaskJob` both derive from :class:`JobState`, so that
a client (:mod:`zarkov.zmr.jobclient`), the aggregation engine and the web service
see one status document whichever engine ran the job: ``state``/``phase``
(``ready`` → ``map`` → ``reduce`` → ``commit`` → ``complete``, or ``error`` with a
``traceback``), ``docs_read``, ``chunks_done``/``chunks_total``,
``partitions_done``/``partitions_total``, ``docs_written``, ``phase_seconds``,
``elapsed``, ``write_path``, ``inline`` and a basic job's ``result``.
"""
from __future__ import annotations

import threading
import time
import traceback
import uuid
from typing import Any, Optional

from zarkov.errors import JobHalted
from zarkov.zmr.jobspec import JobSpec
from zarkov.zmr.jobtable import INLINE

#: The counters of a map-reduce job (a basic job has none).
COUNTERS = ("docs_read", "chunks_done", "chunks_total", "partitions_done",
            "partitions_total", "docs_written")


class JobState:
    """A job's identity, phases and counters; ``finished`` once ``done`` is set.

    Subclasses set ``done`` (an event of their execution model: gevent's in the
    router, a thread's in the gateway) and run the phases.
    """

    done: Any  # an Event: .set(), .is_set()

    def __init__(self, spec: JobSpec, **extra: Any):
        self.spec = spec
        self.job_id = uuid.uuid4().hex
        self.info: dict[str, Any] = {"state": "ready", "phase": "ready", "kind": spec.kind,
                                     **extra}
        if spec.kind != "basic":
            self.info.update(dict.fromkeys(COUNTERS, 0))
        self.created = time.time()
        self.started: Optional[float] = None
        self.ended: Optional[float] = None
        self._phase_start = self.created
        # The gateway's jobs are read by its request loop while their thread runs.
        self._lock = threading.Lock()

    def status(self) -> dict[str, Any]:
        """The job's state and progress, as the ``status`` request reports it."""
        with self._lock:
            out = dict(self.info)
            if "phase_seconds" in out:
                out["phase_seconds"] = dict(out["phase_seconds"])
        if self.started is not None:
            out["elapsed"] = round((self.ended or time.time()) - self.started, 3)
        return out

    @property
    def finished(self) -> bool:
        """Whether the job has ended (complete or error)."""
        return bool(self.done.is_set())

    def drop_inline(self) -> None:
        """Forget an inline output nobody fetched in time (the engine's memory)."""
        with self._lock:
            if self.info.pop("inline", None) is not None:
                self.info["inline_dropped"] = True

    # -- for the engines ------------------------------------------------------------
    def _phase(self, name: str) -> None:
        # Seconds spent in each phase so far: where a slow job spends its time.
        now = time.time()
        with self._lock:
            times = self.info.setdefault("phase_seconds", {})
            if self.info["phase"] in times:
                times[self.info["phase"]] = round(now - self._phase_start, 3)
            if name not in ("complete", "error"):
                times[name] = 0.0
            self._phase_start = now
            self.info["state"] = self.info["phase"] = name

    def _failed(self, tb: str) -> None:
        self._phase("error")
        self.info["traceback"] = tb

    def _add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.info[key] += n

    def _check_sources(self) -> None:
        # Compiling (not running) the sources here fails a job with a syntax error
        # at once, instead of once per task on the workers.
        for what, (text, name) in self.spec.fns.items():
            try:
                compile(text, f"<{what} {name}>", "exec")
            except SyntaxError:
                raise JobHalted(traceback.format_exc()) from None

    def _hand_back(self, outputs: list[dict]) -> None:
        """Outputs handed back in the status instead of written (``inline_max``):
        ``[{name, coll, docs}]``, ``docs`` concatenated BSON; ``docs_inline`` counts
        them (the summary line's figure once the outputs are fetched and dropped)."""
        count = 0
        for out in outputs:
            data, at = out["docs"], 0
            while at + 4 <= len(data):
                at += int.from_bytes(data[at:at + 4], "little")
                count += 1
        with self._lock:
            self.info["inline"] = outputs
            self.info["docs_written"] = 0
            self.info["docs_inline"] = count
            self.info["write_path"] = INLINE

    def _target(self, coll: str) -> str:
        """The output collection of what the map named ``coll``."""
        if self.spec.kind == "mapreduce":
            return self.spec.output_name
        if not isinstance(coll, str) or not coll:
            raise JobHalted(f"xmapreduce: map yielded collection name {coll!r}; "
                            f"it must be a non-empty string")
        return self.spec.output_prefix + coll
