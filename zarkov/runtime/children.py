"""Zarkov's own child processes: one supervisor, one restart policy, one way of
handing them the config.

A :class:`Children` keeps ``count`` processes of one kind running (``python -m
<module>``: a fresh interpreter, no inherited sockets or database connections): the
worker pool's map-reduce workers, the event logger's extra event servers.  The
config goes to every child as JSON in the environment (:data:`CONFIG_ENV`; read
back with :func:`child_config`), with the child's index and the parent's pid, so
that a child needs no argument and cannot disagree with its parent about a key.

Restart policy, the same for every kind: a child that exits is started again — at
once when it asked for it (:data:`~zarkov.errors.EXIT_RECYCLE`: a worker recycling
itself) or failed after a long life; after :data:`STOPPED_GRACE` when it exited 0
(it was stopped by a signal, and a signal to the whole process group — Ctrl-C, a
``kill`` of the group, systemd stopping the unit — is on its way to this process
too: it must not start a child again while stopping); else after a delay that
doubles from :data:`MIN_BACKOFF` to :data:`MAX_BACKOFF` while it keeps dying
within :data:`QUICK_DEATH` seconds, so that a child failing at start-up does not
spin.  Stopping sends SIGTERM, then SIGKILL to those still alive after the
grace time.  A child whose parent is gone (SIGKILLed: it could not stop them)
stops by itself (:func:`watch_parent`).

The monitor is a watched thread (:mod:`.loops`; a greenlet under gevent): should it
die, the process stops.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence

import zarkov
from zarkov import errors
from zarkov.runtime import loops

log = logging.getLogger("zarkov.runtime.children")

#: The environment variables a child reads: its config (JSON), index, parent's pid.
CONFIG_ENV = "ZARKOV_CONFIG"
SOURCE_ENV = "ZARKOV_CONFIG_SOURCE"   # the file it came from, for error messages
INDEX_ENV = "ZARKOV_CHILD_INDEX"
PARENT_ENV = "ZARKOV_PARENT_PID"

POLL = 0.25          # seconds between two looks at the children
MIN_BACKOFF = 0.5    # first delay before restarting a child that keeps failing
MAX_BACKOFF = 10.0   # longest delay
QUICK_DEATH = 5.0    # a child that lived less than this and failed counts as failing
STOPPED_GRACE = 2.0  # wait before starting again a child that was stopped (exit 0)

# The directory that holds the zarkov package, whether installed or a checkout.
_TOP = os.path.dirname(os.path.dirname(os.path.abspath(zarkov.__file__)))


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment, with zarkov importable from where this process
    imported it (children run ``python -m zarkov...`` from any working directory)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = _TOP + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def config_env(config: Any) -> dict[str, str]:
    """The environment variables that hand ``config`` to a child."""
    data = config.as_dict()
    data.pop("source", None)
    return {CONFIG_ENV: json.dumps(data), SOURCE_ENV: config.source}


def child_config(what: str = "<parent>") -> Any:
    """The config a parent handed to this child (:data:`CONFIG_ENV`); errors name the
    parent's file, else ``what``."""
    from zarkov import config as C
    return C.from_dict(json.loads(os.environ[CONFIG_ENV]), os.environ.get(SOURCE_ENV, what))


def child_index() -> int:
    """This child's index among its siblings (0 when started by hand)."""
    return int(os.environ.get(INDEX_ENV, "0"))


def parent_pid() -> Optional[int]:
    """The pid of the Zarkov process that started this child, if one did."""
    value = os.environ.get(PARENT_ENV)
    return int(value) if value else None


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (best effort)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: watch_parent's look still works
        pass


def orphaned() -> bool:
    """Whether the parent that started this child is gone."""
    parent = parent_pid()
    return parent is not None and os.getppid() != parent


def watch_parent(on_gone: Callable[[], None], every: float = 1.0) -> threading.Thread:
    """Call ``on_gone`` once when the parent that started this child is gone (a
    parent SIGKILLed cannot stop its children: they stop themselves)."""
    def watch() -> None:
        while not orphaned():
            time.sleep(every)
        log.warning("the parent process %s is gone; stopping", parent_pid())
        on_gone()
    t = threading.Thread(target=watch, name="parent watch", daemon=True)
    t.start()
    return t


class Children:
    """``count`` processes ``python -m <module>``, kept running (see the module
    docstring).  ``args(index)`` gives a child's extra arguments."""

    def __init__(self, what: str, module: str, count: int, config: Any,
                 args: Callable[[int], Sequence[str]] = lambda i: (),
                 fault_point: str = "children.monitor"):
        self.what = what
        self.fault_point = fault_point
        self.module = module
        self.count = count
        self.args = args
        self._config_env = config_env(config)
        self.procs: list[Optional[subprocess.Popen]] = [None] * count
        self._started_at = [0.0] * count
        self._backoff = [0.0] * count
        self._not_before = [0.0] * count
        self._stop = threading.Event()      # asked to stop: the monitor ends
        self._monitor: Optional[threading.Thread] = None
        self.restarts = 0
        self.errors = loops.Errors(log)

    def pids(self) -> list[int]:
        """Process ids of the children alive now."""
        return [p.pid for p in self.procs if p is not None and p.poll() is None]

    def start(self) -> "Children":
        """Start every child and the monitor that restarts them."""
        for i in range(self.count):
            self._spawn(i)
        self._monitor = loops.start_thread(f"{self.what} monitor", self._watch,
                                           expected_end=self._stop.is_set)
        return self

    def _spawn(self, i: int) -> None:
        env = child_env(**self._config_env, **{INDEX_ENV: str(i),
                                               PARENT_ENV: str(os.getpid())})
        argv = [sys.executable, "-m", self.module, *self.args(i)]
        self.procs[i] = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
        self._started_at[i] = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(POLL):
            try:
                self._look()
            except Exception:  # noqa: BLE001 - e.g. no memory to fork: the next round
                self.errors.record(f"{self.what} monitor")

    def _look(self) -> None:
        """One round: replace each child that exited (after its back-off delay)."""
        from zarkov import faults
        faults.hit(self.fault_point)
        now = time.monotonic()
        for i, p in enumerate(self.procs):
            if self._stop.is_set():
                return
            if p is not None and p.poll() is None:
                continue
            if p is not None:  # just died: decide when to replace it
                lived = now - self._started_at[i]
                self._backoff[i] = self._delay(i, p.returncode, lived)
                self._not_before[i] = now + self._backoff[i]
                level = (logging.INFO if p.returncode in (errors.EXIT_OK, errors.EXIT_RECYCLE)
                         else logging.ERROR)
                log.log(level, "%s %d exited with status %s; starting it again%s (pid %d, "
                        "up %.1f s)", self.what, i, p.returncode,
                        f" in {self._backoff[i]:.1f} s" if self._backoff[i] else "", p.pid,
                        lived)
                self.procs[i] = None
            if now >= self._not_before[i]:
                self._spawn(i)
                self.restarts += 1

    def _delay(self, i: int, status: int, lived: float) -> float:
        """How long to wait before starting child ``i`` again (the policy above)."""
        if status == errors.EXIT_RECYCLE:
            return 0.0
        if status == errors.EXIT_OK:
            return STOPPED_GRACE
        if lived >= QUICK_DEATH:
            return 0.0
        return min(MAX_BACKOFF, max(MIN_BACKOFF, self._backoff[i] * 2))

    def hold(self) -> None:
        """Start no child again from now on (the parent is stopping; the children
        are stopped later, by :meth:`stop`)."""
        self._stop.set()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the monitor, then the children: SIGTERM, SIGKILL after ``timeout`` s.

        Returns True when every child exited with status 0 (a clean stop).
        """
        self._stop.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(5.0)  # so that it does not start a child behind our back
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for p in live:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        ok = True
        for p in live:
            try:
                ok = p.wait(timeout=max(0.1, deadline - time.monotonic())) == 0 and ok
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                ok = False
        return ok
