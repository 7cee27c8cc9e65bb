"""Counters of one event-logger process, and the stats file that shows them.

Each event-server process writes ``stats-<index>.json`` under the journal directory
a few times a second (when something changed), replacing it atomically, so that
operators, tests and ``zcmd serve`` can read what the logger has done without a
socket of its own.  With CURVE and several server processes, the connections
refused on the public sockets are counted by the parent process, in
``stats-proxy.json`` (index -1).
"""
from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any, Callable, Optional

import gevent

from zarkov.histogram import COMMIT_BOUNDS, Histogram
from zarkov.runtime import statsfiles
from zarkov.runtime.loops import Errors

FIELDS = ("accepted", "rejected", "committed", "duplicates", "refused", "errors",
          "db_errors")
PROXY_STATS = "stats-proxy.json"


class Stats:
    """Counters: events accepted (journaled), rejected, committed (confirmed stored),
    duplicates (of the committed ones, already in the database: a replay), refused
    (connections without an authorised CURVE key: nothing they sent was read),
    ``db_errors`` (inserts that failed for want of the database), the commit latency
    (``commit_seconds``), and ``errors``: unexpected exceptions of the process's loops
    (a bug or a broken disk; each logged with its traceback, see
    :class:`zarkov.loops.Errors`)."""

    def __init__(self, index: int = 0):
        self.index = index
        self.pid = os.getpid()
        self.started = time.time()
        self.accepted = 0
        self.rejected = 0
        self.committed = 0
        self.duplicates = 0
        self.refused = 0
        self.backlog_files = 0
        self.db_ok = True
        self.last_db_error: str | None = None
        self.db_errors = 0  # inserts that failed for want of the database (retried)
        #: Seconds from a batch's append to the journal to its acknowledged insert.
        self.commit_seconds = Histogram(COMMIT_BOUNDS)
        self.errors = Errors(logging.getLogger("zarkov.eventlog"))
        # (time, committed so far) after each insert: the recent commit timeline.
        self.commits: collections.deque = collections.deque(maxlen=64)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready snapshot."""
        return {"index": self.index, "pid": self.pid, "started": self.started,
                "accepted": self.accepted, "rejected": self.rejected,
                "committed": self.committed, "duplicates": self.duplicates,
                "refused": self.refused,
                "errors": self.errors.total, "errors_by_loop": dict(self.errors.counts),
                "backlog_files": self.backlog_files, "db_ok": self.db_ok,
                "db_errors": self.db_errors, "commit_seconds": self.commit_seconds.as_dict(),
                "last_db_error": self.last_db_error, "commits": list(self.commits)}


def stats_path(journal_dir: str, index: int) -> str:
    """Where process ``index`` writes its stats."""
    return os.path.join(journal_dir, f"stats-{index}.json")


def write_stats(path: str, stats: Stats) -> None:
    """Replace the stats file atomically (write a temporary file, then rename)."""
    statsfiles.write(path, stats.as_dict())


def write_loop(path: str, stats: Stats, interval: float,
               refresh: Optional[Callable[[], None]] = None) -> None:
    """Rewrite ``path`` whenever the counters changed, every ``interval`` s (a greenlet's
    work); ``refresh()`` first updates counters kept elsewhere."""
    last = None
    while True:
        gevent.sleep(interval)
        try:
            if refresh is not None:
                refresh()
            snap = stats.as_dict()
            if snap != last:
                write_stats(path, stats)
                last = snap
        except Exception:  # noqa: BLE001 - a full disk must not end the stats
            stats.errors.record("stats loop")


def read_stats(journal_dir: str) -> list[dict[str, Any]]:
    """The stats of every process that wrote some under ``journal_dir``."""
    return statsfiles.read_all(journal_dir,
                               lambda n: n.startswith("stats-") and n.endswith(".json"))


def total(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the counters of several processes' snapshots."""
    out: dict[str, Any] = {k: sum(s.get(k, 0) for s in snapshots) for k in FIELDS}
    out["backlog_files"] = sum(s.get("backlog_files", 0) for s in snapshots)
    out["db_ok"] = all(s.get("db_ok", True) for s in snapshots)
    out["processes"] = sum(1 for s in snapshots if s.get("index", 0) >= 0)
    return out
