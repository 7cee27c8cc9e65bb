"""The worker process pool: start N worker processes, restart the dead, stop all.

Each process is ``python -m zarkov.zmr.worker`` started with subprocess (a fresh
interpreter: no gevent, no inherited sockets or database connections).  A process
that exits — recycled after ``requests_per_worker_process`` tasks or past
``suicide_level`` KiB, or killed — is replaced.  One that keeps dying at start-up
is restarted with a growing delay rather than in a tight loop.

Works in a plain process and under gevent (``zcmd zmr-worker``, ``zcmd serve``):
the monitor is a thread, which gevent turns into a greenlet.  An error in one round
of the monitor (no memory to fork, say) is logged and counted, and the next round
tries again; should the monitor die all the same, the process stops
(:mod:`zarkov.supervise`).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from zarkov import faults, security, supervise
from zarkov.children import child_env
from zarkov.config import Config, worker_processes

log = logging.getLogger("zarkov.zmr.pool")

POLL = 0.25          # seconds between two looks at the children
MAX_BACKOFF = 10.0   # longest wait before restarting a process that dies at once
QUICK_DEATH = 5.0    # a process that lived less than this counts as failing


class WorkerPool:
    """``n`` worker processes connected to the router at ``config.zmr.req_uri``."""

    def __init__(self, config: Config, n: int | None = None, verbose: bool = False):
        z = config.zmr
        self.count = worker_processes(z.processes_per_worker if n is None else n)
        self.argv = [sys.executable, "-m", "zarkov.zmr.worker", "--req-uri", z.req_uri,
                     "--max-requests", str(z.requests_per_worker_process),
                     "--suicide-kib", str(z.suicide_level), "--parent-pid", str(os.getpid())]
        files = security.client_key_files(config)
        if files:  # CURVE: the files' paths, never the keys, on the command line
            self.argv += ["--server-key", files[0], "--client-key", files[1]]
        if verbose or config.verbose:
            self.argv.append("--verbose")
        self.procs: list[subprocess.Popen | None] = [None] * self.count
        self._started_at = [0.0] * self.count
        self._backoff = [0.0] * self.count
        self._not_before = [0.0] * self.count
        self._stop = threading.Event()      # asked to stop: the monitor ends
        self._stopped = threading.Event()   # every child reaped
        self._monitor: threading.Thread | None = None
        self.restarts = 0
        self.errors = supervise.Errors(log)

    def pids(self) -> list[int]:
        """Process ids of the running worker processes."""
        return [p.pid for p in self.procs if p is not None and p.poll() is None]

    def start(self) -> "WorkerPool":
        """Start the processes and the monitor that restarts them."""
        for i in range(self.count):
            self._spawn(i)
        self._monitor = supervise.start_thread("worker pool monitor", self._watch,
                                               expected_end=self._stop.is_set)
        log.info("worker pool: %d processes %s", self.count, self.pids())
        return self

    def _spawn(self, i: int) -> None:
        self.procs[i] = subprocess.Popen(self.argv, env=child_env(), stdin=subprocess.DEVNULL)
        self._started_at[i] = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(POLL):
            try:
                self._look()
            except Exception:  # noqa: BLE001 - the next round tries again
                self.errors.record("worker pool monitor")

    def _look(self) -> None:
        """One round: replace each process that exited (after its back-off delay)."""
        faults.hit("pool.monitor")
        now = time.monotonic()
        for i, p in enumerate(self.procs):
            if self._stop.is_set():
                return
            if p is not None and p.poll() is None:
                continue
            if p is not None:  # just died: decide when to replace it
                lived = now - self._started_at[i]
                self._backoff[i] = (min(MAX_BACKOFF, max(0.5, self._backoff[i] * 2))
                                    if lived < QUICK_DEATH and p.returncode != 0 else 0.0)
                self._not_before[i] = now + self._backoff[i]
                log.info("worker process %d exited with %s after %.1f s; restarting%s",
                         p.pid, p.returncode, lived,
                         f" in {self._backoff[i]:.1f} s" if self._backoff[i] else "")
                self.procs[i] = None
            if now >= self._not_before[i]:
                self._spawn(i)
                self.restarts += 1

    def run_forever(self) -> None:
        """Start if needed and block until :meth:`stop` has stopped every process."""
        if self._monitor is None:
            self.start()
        while not self._stopped.wait(1.0):
            pass

    def stop(self, grace: float = 5.0) -> None:
        """Stop the monitor, then the processes: SIGTERM, SIGKILL after ``grace`` s."""
        self._stop.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(5.0)  # so that it does not start a process behind our back
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for p in live:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._stopped.set()
        log.info("worker pool stopped")
