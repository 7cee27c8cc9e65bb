"""Fault injection for tests: make a named point of a loop raise, on demand.

``ZARKOV_FAULTS`` (read once, at import) lists points, comma-separated.  A point
``name`` raises :class:`InjectedFault` (an ordinary exception, which the loop's
guard must survive); ``name:die`` raises :class:`LoopKilled`, a BaseException that
no guard catches, so that the loop dies and the test sees its process exit;
``name:pause`` prints ``zarkov-fault-pause <name>`` on stderr and sleeps for ever,
so that a test can SIGKILL the process at that very point.  A point fires only for
data that contain :data:`MARK`, so that a test chooses which message fails (a point
given no data fires every time).  Unset (always, outside tests), :func:`hit` is one
falsy test.

Points: ``eventlog.message`` (an event server, per message), ``commit.insert`` (a
committer, before inserting a batch: the events are journaled, not stored),
``commit.publish`` (after inserting it, before publishing the streams' bounds),
``router.request`` (a request's handler), ``router.loop`` (the request loop),
``worker.task`` and ``worker.loop`` (a worker process), ``pool.monitor`` (the pool's
monitor, each round).
"""
from __future__ import annotations

import os
import sys
import time

MARK = b"zarkov-fault-injection"


class InjectedFault(Exception):
    """The unexpected exception a test asked for."""


class LoopKilled(BaseException):
    """An exception no loop guard catches: the loop dies (tests only)."""


def _parse(text: str) -> dict[str, str]:
    points = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, mode = item.partition(":")
        points[name] = mode
    return points


_POINTS = _parse(os.environ.get("ZARKOV_FAULTS", ""))


def armed(point: str) -> bool:
    """Whether the tests armed ``point`` (so that its caller may skip preparing data)."""
    return point in _POINTS


def hit(point: str, data: bytes | None = None) -> None:
    """Raise at ``point`` when the tests armed it and ``data`` (if any) holds :data:`MARK`."""
    if _POINTS and point in _POINTS and (data is None or MARK in data):
        mode = _POINTS[point]
        if mode == "die":
            raise LoopKilled(point)
        if mode == "pause":
            print(f"zarkov-fault-pause {point}", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
        raise InjectedFault(f"fault injected at {point}")
