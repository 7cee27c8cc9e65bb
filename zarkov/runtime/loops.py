"""Loops that outlive bad input, and processes that end when one dies all the same.

Every long-lived loop of a Zarkov process (an event server's receive loops and its
committer, the router's request, tasks, sink and tick loops, the worker pool's monitor …)
handles one message or one round at a time inside ``try: … except Exception:
errors.record(…)``: an unexpected exception is logged with its traceback, counted in
an :class:`Errors`, and the loop goes on with the next message.

The loops themselves are started with :func:`spawn` (a greenlet) or
:func:`start_thread`, which watch them.  Should one end with an exception anyway,
:func:`loop_died` logs it, runs what the process's command registered with
:func:`on_death` (which stops the process cleanly: the event logger flushes its
journal), and, should the process still be alive :data:`HARD_EXIT_AFTER` seconds
later, ends it.  Either way its exit status is :data:`EXIT_LOOP_DIED`, so that its
supervisor (the event logger's parent, the worker pool, systemd …) starts it again:
never a live process that no longer reads its socket.
"""
from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable

EXIT_LOOP_DIED = 70          # EX_SOFTWARE (sysexits.h): an internal error
HARD_EXIT_AFTER = 60.0       # seconds a clean stop may take after a loop died
TRACEBACKS_PER_MINUTE = 5    # per loop; the count stays exact
_AFTER_IO = 1e-6             # seconds: any timer, to be resumed after the next I/O poll

log = logging.getLogger(__name__)

_callbacks: list[Callable[[], None]] = []
_died: list[str] = []


class Errors:
    """Unexpected exceptions per loop: counted, logged with their traceback.

    A loop that hits the same bug on every message must not flood the log: each
    loop logs at most :data:`TRACEBACKS_PER_MINUTE` tracebacks a minute, then a
    one-line summary of how many it left out.
    """

    def __init__(self, logger: logging.Logger = log):
        self.log = logger
        self.counts: collections.Counter[str] = collections.Counter()
        self._window: dict[str, tuple[int, int, int]] = {}  # loop -> minute, logged, muted

    @property
    def total(self) -> int:
        """Unexpected exceptions seen in every loop."""
        return sum(self.counts.values())

    def record(self, loop: str, what: str = "") -> None:
        """Count the exception being handled in ``loop``; log it with its traceback."""
        self.counts[loop] += 1
        minute = int(time.monotonic() // 60)
        start, logged, muted = self._window.get(loop, (minute, 0, 0))
        if start != minute:
            if muted:
                self.log.error("%s: %d more unexpected errors not logged", loop, muted)
            start, logged, muted = minute, 0, 0
        if logged < TRACEBACKS_PER_MINUTE:
            logged += 1
            self.log.error("%s: unexpected error%s (the loop goes on):\n%s", loop,
                           f" {what}" if what else "", traceback.format_exc().rstrip())
        else:
            muted += 1
        self._window[loop] = (start, logged, muted)


def on_death(callback: Callable[[], None]) -> None:
    """Call ``callback`` (once) when a watched loop of this process dies."""
    _callbacks.append(callback)


def died() -> str | None:
    """The name of the first watched loop that died, or None."""
    return _died[0] if _died else None


def exit_status(code: int) -> int:
    """``code``, unless a loop died: then :data:`EXIT_LOOP_DIED`."""
    return EXIT_LOOP_DIED if _died else code


def loop_died(name: str, exc: BaseException | None = None) -> None:
    """Report that loop ``name`` ended while its process lives; stop the process."""
    detail = ("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
              if exc is not None else "it returned")
    log.critical("%s died: %s\nthe process stops and exits with status %d so that its "
                 "supervisor starts it again", name, detail, EXIT_LOOP_DIED)
    first = not _died
    _died.append(name)
    if not first:
        return
    _arm_hard_exit()
    for callback in list(_callbacks):
        try:
            callback()
        except Exception:
            log.exception("while stopping after %s died", name)


def _arm_hard_exit() -> None:
    # Why a native thread: it must fire even when the gevent hub is stuck.
    try:
        from gevent import monkey
        start = monkey.get_original("_thread", "start_new_thread")
        sleep = monkey.get_original("time", "sleep")
    except ImportError:  # pragma: no cover - gevent is a dependency
        import _thread
        start, sleep = _thread.start_new_thread, time.sleep

    def later() -> None:
        sleep(HARD_EXIT_AFTER)
        sys.stderr.write(f"zarkov: not stopped {HARD_EXIT_AFTER:g} s after a loop died; "
                         f"exiting with status {EXIT_LOOP_DIED}\n")
        os._exit(EXIT_LOOP_DIED)

    start(later, ())


def let_others_run() -> None:
    """Let every other greenlet that is ready run, those woken by I/O included, then
    go on: what a busy greenlet loop calls between two rounds of work.

    Why not ``gevent.sleep(0)``: that queues the caller as a callback, and gevent runs
    queued callbacks without polling for I/O until it has run fifty of them and its
    switch interval (5 ms) is over, so a loop that queues itself again after each
    round of a few milliseconds keeps a greenlet waiting on a socket waiting a
    hundred milliseconds and more (the event logger's inserts, measured: a
    1,000-document round trip to the server took 40-60 ms during a burst instead of
    10).  A timer fires only after the next poll, so what I/O woke runs first.
    """
    import gevent

    gevent.sleep(_AFTER_IO)


def spawn(name: str, fn: Callable[..., Any], *args: Any):
    """Run ``fn(*args)`` in a greenlet; its death (an exception) stops the process.

    A greenlet killed on purpose (``GreenletExit``) or that returns is not a death:
    loops that must never return check that themselves.
    """
    import gevent

    g = gevent.spawn(fn, *args)
    g.name = name
    g.link_exception(lambda dead: loop_died(name, dead.exception))
    return g


def start_thread(name: str, fn: Callable[..., Any], *args: Any,
                 expected_end: Callable[[], bool] = lambda: False) -> threading.Thread:
    """Run ``fn(*args)`` in a daemon thread (a greenlet under gevent) that is watched.

    It may end only when ``expected_end()`` is true (the owner is stopping); any
    other end, by an exception or a return, stops the process.
    """
    def body() -> None:
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported, then the process stops
            if not expected_end():
                loop_died(name, e)
            return
        if not expected_end():
            loop_died(name)

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    return t
