"""What a worker process has done, in a stats file its pool's ``/metrics`` reads.

Only kept when ``metrics.worker_port`` is set.  Each process of a pool writes
``worker-<index>.json`` in its pool's directory (:func:`stats_dir`): tasks by kind and
outcome, documents mapped, recycles.  A process that replaces a recycled one in the
same slot goes on from the counts its predecessor left, so the pool's counters only
grow (as Prometheus expects of a counter).
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from typing import Any, Optional

import bson

from zarkov.runtime import statsfiles

WRITE_EVERY = 0.5   # seconds between two writes of the file (at most)


def stats_dir(pool_pid: int) -> str:
    """The directory where the processes of the pool run by ``pool_pid`` write."""
    return os.path.join(tempfile.gettempdir(), f"zarkov-workers-{pool_pid}")


def read_all(directory: str) -> list[dict[str, Any]]:
    """The snapshots of every slot of a pool."""
    return statsfiles.read_all(directory, lambda n: n.endswith(".json"))


class WorkerStats:
    """The counters of one worker process, saved to ``path``."""

    def __init__(self, path: str):
        self.path = path
        self.tasks: dict[str, int] = {}
        self.documents = 0
        self.recycles = 0
        self._written = 0.0
        self._lock = threading.Lock()  # the heartbeat thread writes too
        try:
            with open(path) as f:
                before = json.load(f)
            self.tasks = {str(k): int(v) for k, v in (before.get("tasks") or {}).items()}
            self.documents = int(before.get("documents", 0))
            self.recycles = int(before.get("recycles", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # the slot's first process, or an unreadable file: start at 0

    def task(self, request_header: bytes, reply_header: bytes) -> None:
        """Count one task from its request's and its reply's headers."""
        try:
            kind = str(bson.decode(request_header).get("kind"))
            reply = bson.decode(reply_header)
        except Exception:  # noqa: BLE001 - a header the worker could not read either
            kind, reply = "unreadable", {}
        key = f"{kind}:{'ok' if reply.get('ok') else 'failed'}"
        with self._lock:
            self.tasks[key] = self.tasks.get(key, 0) + 1
            if kind in ("map", "mapreduce") and isinstance(reply.get("docs"), int):
                self.documents += reply["docs"]
        self.write()

    def recycled(self) -> None:
        """This process ends to be replaced."""
        with self._lock:
            self.recycles += 1
        self.write(force=True)

    def write(self, force: bool = False) -> None:
        """Replace the file (at most every :data:`WRITE_EVERY` s unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._written < WRITE_EVERY:
            return
        self._written = now
        with self._lock:
            snap = {"pid": os.getpid(), "tasks": dict(self.tasks),
                    "documents": self.documents, "recycles": self.recycles}
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            statsfiles.write(self.path, snap)
        except OSError:
            pass  # a full /tmp must not stop the worker; the next write tries again


def for_this_process(config: Any, pool_pid: Optional[int], index: int) -> Optional[WorkerStats]:
    """The stats of this worker process, when its pool serves ``/metrics``."""
    if not config.metrics.worker_port or not pool_pid:
        return None
    return WorkerStats(os.path.join(stats_dir(pool_pid), f"worker-{index}.json"))
