"""Tasks in flight: send, time limits, sending again, late duplicates.

The router has one :class:`Dispatcher`: it owns the PUSH socket that feeds the
worker processes and routes every message from the sink to the job it belongs
to.  Each phase of a job (map chunks, reduce partitions, ...) is a
:class:`TaskSet`: it keeps at most ``limit()`` tasks in flight, remembers which
tasks were answered, and sends a task again when its time limit passes.

A time limit adapts to the durations observed in the phase (falling back to the
previous phase, then to ``max_chunk_timeout``): a SIGKILLed worker costs a few
task durations, not ten minutes.  The first answer to a task wins; any later
answer (from a worker that was only slow) is counted and dropped.

The sink's port is reachable by any peer: a message that is not a heartbeat or a
reply of the expected shape is counted (``dropped``) and ignored.
"""
from __future__ import annotations

import collections
import logging
import time
from typing import Callable

import bson
import gevent
import gevent.event
import gevent.lock

from zarkov.wire import CODEC

log = logging.getLogger("zarkov.zmr.dispatch")

FLOOR = 2.0         # seconds added to every time limit: scheduling noise, queueing
FACTOR = 3.0        # a task may take this many times the slowest recent one
BYE_GRACE = 0.2     # seconds (plus FACTOR x the estimate) a task may stay unanswered
                    # after a worker process said goodbye: it may have been queued there
MAX_ATTEMPTS = 5    # sends of one task before the job is failed
WORKER_SEEN = 3.5   # seconds since its last heartbeat after which a worker counts as gone


class TaskFailed(Exception):
    """A task of the set failed; ``traceback`` is the worker's (or the router's)."""

    def __init__(self, traceback: str):
        super().__init__(traceback.strip().splitlines()[-1] if traceback.strip() else "task failed")
        self.traceback = traceback


class Task:
    """One message in flight and when it was last sent."""

    __slots__ = ("task_id", "frames", "size", "sent_at", "attempts", "suspect_since")

    def __init__(self, task_id: int, frames: list[bytes], size: int):
        self.task_id = task_id
        self.frames = frames
        self.size = size
        self.sent_at = 0.0
        self.attempts = 0
        #: When a worker process left while this task was out (it may be lost).
        self.suspect_since = 0.0


class Dispatcher:
    """The router's PUSH socket, the registry of task sets and the worker roll-call."""

    def __init__(self, push_socket):
        self.push = push_socket
        # Frames of one multipart message must not interleave with another's, and
        # a green socket must not be waited on by two greenlets at once.
        self._lock = gevent.lock.Semaphore()
        self.sets: dict[str, TaskSet] = {}
        self.workers: dict[tuple[str, int], float] = {}
        self.errors_of: dict[tuple[str, int], int] = {}  # each worker's unexpected errors
        self.unrouted = 0
        self.dropped = 0
        self._last_drop_log = 0.0

    def send(self, frames: list[bytes]) -> None:
        """Send one task (blocks while no worker can take it)."""
        with self._lock:
            self.push.send_multipart(frames)

    def register(self, taskset: "TaskSet") -> None:
        """Route replies for ``taskset.job_id`` to ``taskset``."""
        self.sets[taskset.job_id] = taskset

    def unregister(self, taskset: "TaskSet") -> None:
        """Stop routing replies to ``taskset`` (a later one may have replaced it)."""
        if self.sets.get(taskset.job_id) is taskset:
            del self.sets[taskset.job_id]

    def on_message(self, frames: list[bytes]) -> None:
        """Handle one message from the sink: a heartbeat or a task's reply."""
        try:
            header = bson.decode(frames[0], CODEC)
        except Exception:  # noqa: BLE001 - a garbled message must not stop the sink
            self._drop("not BSON")
            return
        now = time.monotonic()
        if "bye" in header:
            # A worker process recycling itself: a task pushed to it after its last
            # one is lost with it; send again soon what does not come back.
            pid, host = header["bye"], header.get("host", "?")
            if type(pid) is not int or pid <= 0 or type(host) is not str:
                self._drop("a goodbye without a process id and a host name")
                return
            self.workers.pop((host, pid), None)
            for ts in list(self.sets.values()):
                ts.suspect(now)
            return
        if "hb" in header:
            pid, host = header["hb"], header.get("host", "?")
            # Why type(): bson's Code is an unhashable str subclass, Int64 an int one.
            if type(pid) is not int or pid <= 0 or type(host) is not str:
                self._drop("a heartbeat without a process id and a host name")
                return
            self.workers[(host, pid)] = now
            errors = header.get("errors", 0)
            if type(errors) is int:
                self.errors_of[(host, pid)] = errors
            return
        job_id, task_id = header.get("j"), header.get("t")
        if type(job_id) is not str or type(task_id) is not int:
            self._drop("a reply without a job id string and a task number")
            return
        ts = self.sets.get(job_id)
        if ts is None:
            self.unrouted += 1  # a late answer for a job that has moved on or ended
            return
        ts.on_reply(header, frames[1:])

    def _drop(self, why: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log > 10:  # why: a peer gone mad must not flood the log
            self._last_drop_log = now
            log.warning("dropped a message from the sink: %s (%d dropped so far)",
                        why, self.dropped)

    def worker_errors(self) -> int:
        """Unexpected errors reported by the worker processes alive now."""
        live = set(self.live_workers())
        return sum(n for key, n in self.errors_of.items() if key in live)

    def live_workers(self) -> list[tuple[str, int]]:
        """(host, pid) of the worker processes heard from recently."""
        now = time.monotonic()
        for key, seen in list(self.workers.items()):
            if now - seen > WORKER_SEEN * 10:
                del self.workers[key]
                self.errors_of.pop(key, None)
        return sorted(k for k, seen in self.workers.items() if now - seen <= WORKER_SEEN)

    def limit(self, outstanding: int) -> int:
        """Tasks one set may have in flight: enough that no worker process idles.

        Two per live process keep each busy while its next task travels.
        """
        return max(outstanding, 2 * len(self.live_workers()))

    def tick(self) -> None:
        """Send again the tasks whose time limit has passed (called periodically)."""
        now = time.monotonic()
        for ts in list(self.sets.values()):
            ts.resend_expired(now)


class TaskSet:
    """The tasks of one phase of one job."""

    def __init__(self, dispatcher: Dispatcher, job_id: str, name: str,
                 on_result: Callable[[int, dict, list[bytes]], None],
                 limit: Callable[[], int], cap: float, previous: "TaskSet | None" = None):
        self.dispatcher = dispatcher
        self.job_id = job_id
        self.name = name
        self.on_result = on_result
        self.limit = limit
        self.cap = float(cap)
        self.pending: dict[int, Task] = {}
        self.done: set[int] = set()
        self.recent: collections.deque[tuple[float, int]] = collections.deque(
            previous.recent if previous else (), maxlen=16)
        self.resent = 0
        self.duplicates = 0
        self.error: TaskFailed | None = None
        self.closed = False
        self._slot = gevent.event.Event()
        self._finished = gevent.event.Event()
        dispatcher.register(self)

    # -- the job's side -------------------------------------------------------

    def add(self, task_id: int, frames: list[bytes], size: int = 0) -> None:
        """Send a new task, first waiting while ``limit()`` tasks are in flight."""
        while len(self.pending) >= self.limit() and self.error is None:
            self._slot.clear()
            self._slot.wait(1.0)  # the limit grows as workers appear: look again
        if self.error is not None:
            raise self.error
        task = Task(task_id, frames, size)
        self.pending[task_id] = task
        self._send(task)

    def close(self) -> None:
        """No more tasks will be added."""
        self.closed = True
        self._check_finished()

    def wait(self) -> None:
        """Block until every task is answered; raise TaskFailed if one failed."""
        self._finished.wait()
        self.dispatcher.unregister(self)
        if self.error is not None:
            raise self.error

    def fail(self, traceback: str) -> None:
        """End the set in failure (a task failed, or its result could not be used)."""
        if self.error is None:
            self.error = TaskFailed(traceback)
        self.pending.clear()
        self._slot.set()
        self._finished.set()

    # -- the dispatcher's side ------------------------------------------------

    def on_reply(self, header: dict, frames: list[bytes]) -> None:
        """A worker answered task ``header['t']``: first answers count, others not."""
        task = self.pending.get(header.get("t"))
        if task is None:
            self.duplicates += 1
            return
        if not header.get("ok"):
            tb = header.get("traceback")
            self.fail(tb if isinstance(tb, str) and tb.strip()
                      else "a worker reported a failure without traceback")
            return
        del self.pending[task.task_id]
        self.done.add(task.task_id)
        self.recent.append((time.monotonic() - task.sent_at, task.size))
        try:
            self.on_result(task.task_id, header, frames)
        except Exception:  # noqa: BLE001 - the job reports it with the traceback
            import traceback
            self.fail(traceback.format_exc())
            return
        self._slot.set()
        self._check_finished()

    def _estimate(self, task: Task) -> float | None:
        """Seconds ``task`` should take, from the recent ones (None: no idea yet)."""
        if not self.recent:
            return None
        slowest = max(d for d, _ in self.recent)
        per_byte = max(d / s for d, s in self.recent if s) if any(s for _, s in self.recent) else 0.0
        return max(slowest, per_byte * task.size)

    def time_limit(self, task: Task) -> float:
        """Seconds ``task`` may stay unanswered before it is sent again."""
        estimate = self._estimate(task)
        if estimate is None:
            return self.cap
        return min(self.cap, FLOOR + FACTOR * estimate)

    def suspect(self, now: float) -> None:
        """A worker process left: the tasks out since before ``now`` may be lost."""
        for task in self.pending.values():
            if task.sent_at and task.sent_at < now and not task.suspect_since:
                task.suspect_since = now

    def _expired(self, task: Task, now: float) -> bool:
        if not task.sent_at:
            return False
        if task.suspect_since:
            estimate = self._estimate(task) or 0.0
            if now - task.suspect_since > BYE_GRACE + FACTOR * estimate:
                return True
        return now - task.sent_at > self.time_limit(task)

    def resend_expired(self, now: float) -> None:
        """Send again each task whose time limit has passed; fail after MAX_ATTEMPTS."""
        for task in list(self.pending.values()):
            if self._expired(task, now):
                if task.attempts >= MAX_ATTEMPTS:
                    self.fail(f"{self.name} task {task.task_id} was not answered after "
                              f"{task.attempts} attempts of up to {self.time_limit(task):.1f} s; "
                              f"worker processes may be dying on it")
                    return
                log.info("job %s: %s task %d not answered in %.1f s: sending it again",
                         self.job_id, self.name, task.task_id, now - task.sent_at)
                self.resent += 1
                self._send(task)

    def _send(self, task: Task) -> None:
        task.sent_at = 0.0  # not timed while the send waits for a worker
        task.suspect_since = 0.0
        task.attempts += 1
        self.dispatcher.send(task.frames)
        task.sent_at = time.monotonic()

    def _check_finished(self) -> None:
        if self.closed and not self.pending:
            self._finished.set()
