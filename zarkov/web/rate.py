"""Events stored per second over the last minutes, from the event logger's stats files.

Every event-server process (and the web service's own intake) rewrites a stats file
a few times a second (:mod:`zarkov.eventlog.stats`) with its counters and its recent
commit timeline: ``(time, committed so far)`` after each insert, the last 64.  An
:class:`EventRate` reads those files every second, keeps every point of every
process's timeline for ``KEEP`` seconds, and turns the increments into a rate per
time bucket.  A process is known by its file, pid and start time, so a restarted
logger (whose counters start again from 0) is a new process.

Event servers on other hosts write no file here: their rate comes from the
registry of streams (:mod:`zarkov.streams`, ``event_stream``), which every committer
updates after each insert with how far its stream is stored.  Each sample reads it
once and keeps, per stream, ``(updated, stored)``: a stream then counts like a
process.  The streams this host's files already count (same host, a journal under
the same directory) are left out, so that nothing counts twice.
"""
from __future__ import annotations

import datetime as dt
import glob
import os
import socket
import time
from typing import Any, Callable, Iterable, Optional

import gevent
from pymongo.errors import PyMongoError

from zarkov import streams
from zarkov.eventlog.stats import FIELDS, read_stats, total
from zarkov.lease import utc_seconds
from zarkov.runtime import loops

KEEP = 1800.0      # seconds of history kept (the longest window that can be asked)
TIMELINE = 64      # points a stats file keeps (Stats.commits maxlen)
SAMPLE_EVERY = 1.0
NOW_WINDOW = 10.0  # seconds over which the "now" rate is computed
NEW_STREAM = 5.0   # seconds: a stream first seen this soon after it began counts whole


class EventRate:
    """The event rate of the loggers writing under one journal directory."""

    def __init__(self, journal_dir: str):
        self.journal_dir = journal_dir
        # process key -> {time: committed so far}
        self.points: dict[tuple, dict[float, int]] = {}
        self.latest: dict[tuple, dict[str, Any]] = {}
        self._sampled = 0.0
        self._greenlet: Optional[gevent.Greenlet] = None
        self.errors = loops.Errors()
        self._registry: Optional[Callable[[], Iterable[dict[str, Any]]]] = None

    def read_streams_from(self, db: Any) -> None:
        """Count too the streams of the registry in database ``db`` that no stats file
        here counts (event servers on other hosts)."""
        self._registry = lambda: streams.listing(db)

    def stats_dirs(self) -> list[str]:
        """The journal directory and the web intakes' directories under it."""
        return [self.journal_dir] + sorted(glob.glob(os.path.join(self.journal_dir, "web-*")))

    def sample(self, now: Optional[float] = None) -> None:
        """Read every stats file (and the registry) once and merge the timelines;
        ``now``: the time of the sample (default: the clock's)."""
        now = time.time() if now is None else now
        self._sampled = time.monotonic()
        seen = set()
        for directory in self.stats_dirs():
            for snap in read_stats(directory):
                key = (directory, snap.get("index"), snap.get("pid"), snap.get("started"))
                seen.add(key)
                self.latest[key] = snap
                pts = self.points.get(key)
                commits = snap.get("commits") or []
                if pts is None:
                    pts = self.points[key] = {}
                    # A timeline that is not full starts at the process's start, at 0.
                    if len(commits) < TIMELINE and snap.get("started"):
                        pts[float(snap["started"])] = 0
                for t, c in commits:
                    pts[float(t)] = int(c)
        seen |= self._sample_streams(now)
        cutoff = now - KEEP
        for key in list(self.points):
            pts = self.points[key]
            expired = sorted(t for t in pts if t < cutoff)
            # The last point before the history's start stays, while its process or
            # stream is there: the increment of its next insert starts from it.
            for t in expired[:-1]:
                del pts[t]
            if key not in seen:
                self.latest.pop(key, None)
                if not pts or max(pts) < cutoff:
                    del self.points[key]

    def _sample_streams(self, now: float) -> set[tuple]:
        """Merge the registry's streams that are not this host's; their keys."""
        if self._registry is None:
            return set()
        try:
            docs = list(self._registry())
        except PyMongoError:  # no database: /health says so; the files still count
            return set()
        here, mine = socket.gethostname(), os.path.realpath(self.journal_dir)
        keys = set()
        for doc in docs:
            journal = doc.get("journal")
            if doc.get("host") == here and isinstance(journal, str) and \
                    os.path.realpath(journal).startswith(mine + os.sep):
                continue  # counted by its stats file
            updated = utc_seconds(doc["updated"])
            key = ("stream", doc["_id"])
            keys.add(key)
            pts = self.points.get(key)
            if pts is None:
                pts = self.points[key] = {}
                began = doc.get("started")
                started = utc_seconds(began) if isinstance(began, dt.datetime) else None
                # A stream that began just now counts from its first event (positions
                # start at 1; ``started`` is its first insert); an older one from now
                # on, not all its history at once.
                if started is not None and now - NEW_STREAM <= started <= updated:
                    pts[min(started, now) - 1e-3] = 0
            # Another host's clock may be ahead: never a point in the future.
            pts[min(updated, now)] = int(doc["stored"])
        return keys

    def fresh(self) -> None:
        """Sample unless a sample was taken within the last half second."""
        if time.monotonic() - self._sampled > 0.5:
            self.sample()

    def _increments(self) -> list[tuple[float, int]]:
        out = []
        for pts in self.points.values():
            times = sorted(pts)
            for t0, t1 in zip(times, times[1:]):
                if pts[t1] >= pts[t0]:
                    out.append((t1, pts[t1] - pts[t0]))
        return out

    def report(self, seconds: int = 300, step: int = 5) -> dict[str, Any]:
        """Rate per ``step`` s over the last ``seconds`` s, the rate now and the counters."""
        self.fresh()
        now = time.time()
        end = (int(now) // step + 1) * step
        start = end - seconds
        buckets = [0] * (seconds // step)
        recent = 0
        for t, n in self._increments():
            if start <= t < end:
                buckets[int((t - start) // step)] += n
            if t > now - NOW_WINDOW:
                recent += n
        series = [[int((start + i * step) * 1000), round(n / step, 3)]
                  for i, n in enumerate(buckets)]
        counters = total(list(self.latest.values()))
        return {"now": round(recent / NOW_WINDOW, 3), "window": NOW_WINDOW, "step": step,
                "seconds": seconds, "series": series,
                "totals": {k: counters[k] for k in (*FIELDS, "backlog_files", "db_ok",
                                                    "processes")}}

    def start(self) -> "EventRate":
        """Sample every second in a greenlet, so history builds up while nobody looks."""
        self._greenlet = loops.spawn("web: event rate sampler", self._loop)
        return self

    def _loop(self) -> None:
        while True:
            try:
                self.sample()
            except OSError:  # the journal directory went away: try again later
                pass
            except Exception:  # noqa: BLE001 - a sampler must not die of one bad file
                self.errors.record("event rate sampler")
            gevent.sleep(SAMPLE_EVERY)

    def stop(self) -> None:
        """Stop sampling."""
        if self._greenlet is not None:
            self._greenlet.kill()

