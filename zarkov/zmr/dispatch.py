"""Tasks in flight: who holds each one, time limits, sending again, late duplicates.

The router has one :class:`Dispatcher`.  It owns the ROUTER socket (``tasks``, at
the router's ``src_port``) to which every worker process connects a DEALER, and reads
the heartbeats that arrive on the sink.  Each phase of a job (map chunks, reduce
partitions, ...) is a :class:`TaskSet`: it keeps at most ``limit()`` tasks pending,
remembers which were answered, and measures how long they take.

**Tasks go out by credit.**  A worker process tells the router how many more tasks
it takes (``ready``: the tasks it has received so far, ``seen``, and how many it
could hold now, ``free``; two: the one it runs and the next, so that it never waits
for work) in its first message, in every reply and, while idle, every second.  The
router sends a task only to a connection that has room for it (``free`` less the
tasks sent there and not yet seen), the idlest first, and remembers which connection
holds which task.  A worker process never receives a task it did not ask for, and it
stops asking before its last one, so a process that recycles itself takes nothing
with it.

**A task whose worker process is gone goes out again at once.**  A task held by a
connection is sent again (to the front of the queue) when that process says goodbye,
when its connection is found closed (every tick the router sends each connection an
empty probe; a closed one refuses it — within a fraction of a second of a process
dying on any host whose kernel closes its sockets), or when neither its heartbeats
nor its messages have been heard for ``WORKER_SEEN`` seconds (a host cut off).  A
task whose worker process is alive keeps its time limit, which adapts to the
durations observed in the phase (falling back to the previous phase, then to
``max_chunk_timeout``) and is counted from when that process started it (after the
task it held before), so a slow map is not sent twice needlessly; a stuck process's
next task moves with the stuck one.  A task fails its job once ``MAX_ATTEMPTS`` of
its sends ended with its time limit or with the connection of the process running
it closing (processes dying on it); a goodbye or silence costs no attempt.  Each
set counts its tasks sent again for either cause (``resent_lost``,
``resent_for_time_limit``).  The first answer to a task wins; any later one is
counted and dropped.

Both sockets are reachable by any peer that may connect: a message that is not of
the expected shape is counted (``dropped``) and ignored.
"""
from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable

import bson
import gevent
import gevent.event
import gevent.lock

from zarkov import wire
from zarkov.errors import ZarkovError
from zarkov.wire import CODEC, is_int

log = logging.getLogger("zarkov.zmr.dispatch")

FLOOR = 2.0         # seconds added to every time limit: scheduling noise, queueing
FACTOR = 3.0        # a task may take this many times the slowest recent one
MAX_ATTEMPTS = 5    # sends of one task ending in its time limit or its process gone
WORKER_SEEN = 3.5   # seconds without a heartbeat or a message after which a worker is gone
GONE_GRACE = 0.1    # seconds between finding a connection closed and sending its tasks
                    # again: the replies it sent before closing are read meanwhile
MAX_FREE = 64       # the most tasks a worker process may ask to hold at once
PROBE = b""         # the router's probe of a connection; workers ignore it

TIME_LIMIT = "time limit"
LOST = "lost"


class TaskFailed(ZarkovError):
    """A task of the set failed; ``traceback`` is the worker's (or the router's)."""

    def __init__(self, traceback: str):
        super().__init__(traceback.strip().splitlines()[-1] if traceback.strip()
                         else "task failed", traceback)


class Assignment:
    """One task of a set: its message, and where and since when it is out."""

    __slots__ = ("taskset", "task_id", "frames", "size", "sent_at", "started", "strikes",
                 "conn")

    def __init__(self, taskset: "TaskSet", task_id: int, frames: list[bytes], size: int):
        self.taskset = taskset
        self.task_id = task_id
        self.frames = frames
        self.size = size
        self.sent_at = 0.0   # when it was last sent (0: waiting for a worker)
        self.started = 0.0   # when its worker process began it, as far as the router knows
        self.strikes = 0     # sends ended by its time limit or by its process dying on it
        self.conn: Conn | None = None  # the connection holding it

    @property
    def live(self) -> bool:
        """Whether its set still waits for its answer."""
        return self.taskset.pending.get(self.task_id) is self


class Conn:
    """A worker process's connection to the tasks socket, as the router sees it."""

    __slots__ = ("rid", "pid", "host", "base", "seen", "free", "sent", "tasks", "heard", "gone")

    def __init__(self, rid: bytes, pid: int, host: str, seen: int, now: float):
        self.rid = rid
        self.pid = pid
        self.host = host
        self.base = seen     # what it had seen when it first spoke on this connection
        self.seen = seen     # tasks it has received (its own count, from its last message)
        self.free = 0        # tasks it could take when it last spoke
        self.sent = 0        # tasks sent on this connection
        self.tasks: list[Assignment] = []  # sent here and not answered, in the order sent
        self.heard = now     # when it last spoke
        self.gone = 0.0      # when its connection was found closed

    def room(self) -> int:
        """Tasks that may be sent to it now: its free places less those on their way."""
        if self.gone:
            return 0
        return self.free - (self.sent - (self.seen - self.base))

    def take(self, job_id: str, task_id: int, now: float, answered: bool = True) -> None:
        """Forget task (``job_id``, ``task_id``): it answered it (``answered``: whatever
        it holds next begins now, as it works in the order sent), or another process
        answered it first (this one still works on it)."""
        for i, task in enumerate(self.tasks):
            if task.task_id == task_id and task.taskset.job_id == job_id:
                del self.tasks[i]
                if task.conn is self:
                    task.conn = None
                break
        if answered and self.tasks and not self.tasks[0].started:
            self.tasks[0].started = now


class Dispatcher:
    """The tasks socket, the queue of tasks waiting for a worker, who holds what, and
    the worker roll-call."""

    def __init__(self, tasks_socket):
        self.sock = tasks_socket
        # Frames of one multipart message must not interleave with another's.
        self._lock = gevent.lock.Semaphore()
        self.sets: dict[str, TaskSet] = {}
        self.queue: collections.deque[Assignment] = collections.deque()
        self.conns: dict[bytes, Conn] = {}
        self.workers: dict[tuple[str, int], float] = {}  # (host, pid) -> last heartbeat
        self.errors_of: dict[tuple[str, int], int] = {}  # each worker's unexpected errors
        self.unrouted = 0
        self.dropped = 0
        self.resent_lost = 0
        self.resent_for_time_limit = 0
        self._last_drop_log = 0.0

    # -- the jobs' side ------------------------------------------------------------

    def register(self, taskset: "TaskSet") -> None:
        """Route replies for ``taskset.job_id`` to ``taskset``."""
        self.sets[taskset.job_id] = taskset

    def unregister(self, taskset: "TaskSet") -> None:
        """Stop routing replies to ``taskset`` (a later one may have replaced it)."""
        if self.sets.get(taskset.job_id) is taskset:
            del self.sets[taskset.job_id]
        self.discard(taskset)

    def submit(self, task: Assignment) -> None:
        """Send ``task`` to a worker process as soon as one has room for it."""
        self.queue.append(task)
        self.dispatch()

    def discard(self, taskset: "TaskSet") -> None:
        """Drop the tasks of ``taskset`` still waiting for a worker (it has ended)."""
        if any(t.taskset is taskset for t in self.queue):
            self.queue = collections.deque(t for t in self.queue if t.taskset is not taskset)

    def waiting(self) -> int:
        """Tasks waiting for a worker process with room."""
        return sum(1 for t in self.queue if t.live)

    # -- sending -------------------------------------------------------------------

    def dispatch(self) -> None:
        """Send waiting tasks to the connections with room, the idlest first."""
        while self.queue:
            conn = self._pick()
            if conn is None:
                return
            task = self.queue.popleft()
            if task.live:
                self._send_task(conn, task)

    def _pick(self) -> "Conn | None":
        best, key = None, None
        for conn in self.conns.values():
            room = conn.room()
            if room > 0 and (key is None or (len(conn.tasks), -room) < key):
                best, key = conn, (len(conn.tasks), -room)
        return best

    def _send(self, conn: Conn, frames: list[bytes]) -> str:
        """Send ``frames`` to ``conn`` without waiting: ``sent``, ``full`` or ``gone``."""
        z = wire.zmq_module()
        try:
            with self._lock:
                self.sock.send_multipart([conn.rid, *frames], z.NOBLOCK)
        except z.Again:
            return "full"
        except z.ZMQError as e:
            if e.errno == z.EHOSTUNREACH:  # ROUTER_MANDATORY: no such connection any more
                return "gone"
            raise
        return "sent"

    def _send_task(self, conn: Conn, task: Assignment) -> None:
        outcome = self._send(conn, task.frames)
        now = time.monotonic()
        if outcome != "sent":
            if outcome == "gone":
                conn.gone = conn.gone or now
            else:
                conn.free = 0  # until it speaks again
            self.queue.appendleft(task)
            return
        # It begins at once unless the process has something before it: a task it
        # holds, or one moved away from it that it will still work through.
        ahead = conn.tasks or conn.sent != conn.seen - conn.base
        task.conn = conn
        task.sent_at = now
        task.started = 0.0 if ahead else now
        conn.tasks.append(task)
        conn.sent += 1

    # -- sending again ---------------------------------------------------------------

    def _release(self, conn: Conn, now: float, reason: str, why: str,
                 strike: bool) -> None:
        """Send again every task ``conn`` holds; with ``strike``, the one it was
        running counts as a failed attempt."""
        tasks, conn.tasks = conn.tasks, []
        for task in tasks:
            if task.conn is conn:
                task.conn = None
        who = f"{why} (worker process {conn.pid} of {conn.host})"
        for i in reversed(range(len(tasks))):  # to the queue's front, in their order
            self._again(tasks[i], now, reason, strike and i == 0, who)

    def _again(self, task: Assignment, now: float, reason: str, strike: bool, why: str) -> None:
        if not task.live:
            return
        ts = task.taskset
        if strike:
            task.strikes += 1
            if task.strikes >= MAX_ATTEMPTS:
                ts.fail(f"{ts.name} task {task.task_id} was not answered after "
                        f"{task.strikes} attempts of up to {ts.time_limit(task):.1f} s "
                        f"each; worker processes may be dying on it (the last: {why})")
                return
        if reason == TIME_LIMIT:
            ts.resent_for_time_limit += 1
            self.resent_for_time_limit += 1
        else:
            ts.resent_lost += 1
            self.resent_lost += 1
        log.info("job %s: %s task %d %s: sending it again", ts.job_id, ts.name,
                 task.task_id, why)
        task.sent_at = task.started = 0.0
        self.queue.appendleft(task)

    def tick(self, now: float | None = None) -> None:
        """Called periodically: probe every connection, send again the tasks of those
        gone, silent or past their time limit, and hand out what waits."""
        now = time.monotonic() if now is None else now
        for conn in list(self.conns.values()):
            if conn.gone:
                if now - conn.gone >= GONE_GRACE:
                    self._forget(conn, now, "went away")
                continue
            heard = max(conn.heard, self.workers.get((conn.host, conn.pid), 0.0))
            if now - heard > WORKER_SEEN:
                # Its host cut off, most likely; but a process whose map holds the GIL
                # in one long C call is silent too: no attempt counted.
                self._forget(conn, now, f"not heard from in {now - heard:.1f} s",
                             strike=False)
                continue
            if self._send(conn, [PROBE]) == "gone":
                conn.gone = now
                continue
            if conn.tasks:
                head = conn.tasks[0]
                # Not known to have begun (it holds tasks moved away before it): timed
                # from its send, so that it never waits for ever.
                began = head.started or head.sent_at
                if now - began > head.taskset.time_limit(head):
                    # The process is stuck on it: what it holds after it moves too.
                    self._release(conn, now, TIME_LIMIT,
                                  f"not answered in {now - began:.1f} s", strike=True)
        self.dispatch()

    def _forget(self, conn: Conn, now: float, why: str, strike: bool = True) -> None:
        """``conn`` is gone: send again what it holds (the one it ran as an attempt)."""
        self.conns.pop(conn.rid, None)
        head = conn.tasks[0] if conn.tasks else None
        self._release(conn, now, LOST, why, strike and head is not None and bool(head.started))

    # -- messages --------------------------------------------------------------------

    def on_worker(self, frames: list[bytes]) -> None:
        """Handle one message from a worker process on the tasks socket: an
        announcement of room, a task's reply, or a goodbye."""
        if len(frames) < 2:
            self._drop("a message without a header")
            return
        rid = frames[0]
        try:
            header = bson.decode(frames[1], CODEC)
        except Exception:  # noqa: BLE001 - a garbled message must not stop the loop
            self._drop("not BSON")
            return
        now = time.monotonic()
        if "bye" in header:
            pid, host = header["bye"], header.get("host", "?")
            if not _worker_id(pid, host):
                self._drop("a goodbye without a process id and a host name")
                return
            # It answered all it began; what it holds beside goes to the others now.
            self.workers.pop((host, pid), None)
            conn = self.conns.get(rid)
            if conn is not None:
                self._forget(conn, now, "said goodbye", strike=False)
            self.dispatch()
            return
        conn = self.conns.get(rid)
        if "ready" in header:
            conn = self._ready(rid, conn, header["ready"], now)
            if conn is None:
                return
        is_reply = "j" in header or "t" in header
        if is_reply:
            job_id, task_id = header.get("j"), header.get("t")
            if type(job_id) is not str or not is_int(task_id):
                self._drop("a reply without a job id string and a task number")
                return
            self._on_reply(conn, job_id, task_id, header, frames[2:], now)
        elif "ready" not in header:
            self._drop("neither a reply, a request for tasks nor a goodbye")
            return
        self.dispatch()

    def _ready(self, rid: bytes, conn: "Conn | None", ready, now: float) -> "Conn | None":
        """The worker's count of tasks seen and its free places; None if malformed."""
        if not isinstance(ready, dict):
            self._drop("'ready' is not a document")
            return None
        fields: list[Any] = [ready.get(k) for k in ("pid", "host", "seen", "free")]
        pid, host, seen, free = fields
        # Why type() for strings: bson's Code is an unhashable str subclass.
        if not _worker_id(pid, host) or not is_int(seen) or not is_int(free) \
                or not 0 <= seen < 1 << 62 or not 0 <= free <= MAX_FREE:
            self._drop("'ready' without a process id, a host name, and counts in range")
            return None
        if conn is None:
            conn = self.conns[rid] = Conn(rid, pid, host, seen, now)
        elif (pid, host) != (conn.pid, conn.host) or seen < conn.seen:
            self._drop("'ready' that contradicts the connection's earlier ones")
            return None
        if seen - conn.base > conn.sent:
            # It received more than was sent here: tasks of an earlier router, read
            # after this connection began.  Count from here.
            conn.base = seen - conn.sent
        conn.seen, conn.free, conn.heard = seen, free, now
        # A worker asking for tasks is alive: counted before its first heartbeat.
        self.workers[(host, pid)] = time.monotonic()
        return conn

    def _on_reply(self, conn: "Conn | None", job_id: str, task_id: int, header: dict,
                  frames: list[bytes], now: float) -> None:
        if conn is not None:
            conn.take(job_id, task_id, now)
        ts = self.sets.get(job_id)
        if ts is None:
            self.unrouted += 1  # a late answer for a job that has moved on or ended
            return
        task = ts.pending.get(task_id)
        if task is None:
            ts.duplicates += 1
            return
        if task.conn is not None:  # answered by another process than the one holding it
            task.conn.take(job_id, task_id, now, answered=False)
        ts.on_reply(task, header, frames, now)

    def on_sink(self, frames: list[bytes]) -> None:
        """Handle one message from the sink: a worker process's heartbeat."""
        try:
            header = bson.decode(frames[0], CODEC)
        except Exception:  # noqa: BLE001 - a garbled message must not stop the sink
            self._drop("not BSON")
            return
        pid, host = header.get("hb"), header.get("host", "?")
        if not _worker_id(pid, host):
            self._drop("not a heartbeat with a process id and a host name")
            return
        self.workers[(host, pid)] = time.monotonic()
        errors = header.get("errors", 0)
        if is_int(errors):
            self.errors_of[(host, pid)] = errors

    def _drop(self, why: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log > 10:  # why: a peer gone mad must not flood the log
            self._last_drop_log = now
            log.warning("dropped a message from a worker's socket: %s (%d dropped so far)",
                        why, self.dropped)

    # -- the roll-call ---------------------------------------------------------------

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
        """Tasks one set may have pending: enough that no worker process idles.

        Two per live process keep each busy while its next task travels.
        """
        return max(outstanding, 2 * len(self.live_workers()))


def _worker_id(pid, host) -> bool:
    """Whether (pid, host) can name a worker process."""
    return is_int(pid) and 0 < pid < 1 << 31 and type(host) is str and 0 < len(host) < 256


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
        self.pending: dict[int, Assignment] = {}
        self.done: set[int] = set()
        self.recent: collections.deque[tuple[float, int]] = collections.deque(
            previous.recent if previous else (), maxlen=16)
        self.resent_lost = 0            # sent again: its worker process went away
        self.resent_for_time_limit = 0  # sent again: not answered within its time limit
        self.duplicates = 0
        self.error: TaskFailed | None = None
        self.closed = False
        self._slot = gevent.event.Event()
        self._finished = gevent.event.Event()
        dispatcher.register(self)

    @property
    def resent(self) -> int:
        """Tasks sent again, for whatever reason."""
        return self.resent_lost + self.resent_for_time_limit

    # -- the job's side -------------------------------------------------------

    def add(self, task_id: int, frames: list[bytes], size: int = 0) -> None:
        """Queue a new task, first waiting while ``limit()`` tasks are pending."""
        while len(self.pending) >= self.limit() and self.error is None:
            self._slot.clear()
            self._slot.wait(1.0)  # the limit grows as workers appear: look again
        if self.error is not None:
            raise self.error
        task = Assignment(self, task_id, frames, size)
        self.pending[task_id] = task
        self.dispatcher.submit(task)

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
        self.dispatcher.discard(self)
        self._slot.set()
        self._finished.set()

    # -- the dispatcher's side ------------------------------------------------

    def on_reply(self, task: Assignment, header: dict, frames: list[bytes], now: float) -> None:
        """The first answer to ``task`` (pending): its result, or the set's failure."""
        if not header.get("ok"):
            tb = header.get("traceback")
            self.fail(tb if isinstance(tb, str) and tb.strip()
                      else "a worker reported a failure without traceback")
            return
        del self.pending[task.task_id]
        self.done.add(task.task_id)
        self.recent.append((now - (task.started or task.sent_at or now), task.size))
        try:
            self.on_result(task.task_id, header, frames)
        except Exception:  # noqa: BLE001 - the job reports it with the traceback
            import traceback
            self.fail(traceback.format_exc())
            return
        self._slot.set()
        self._check_finished()

    def _estimate(self, task: Assignment) -> float | None:
        """Seconds ``task`` should take, from the recent ones (None: no idea yet)."""
        if not self.recent:
            return None
        slowest = max(d for d, _ in self.recent)
        per_byte = (max(d / s for d, s in self.recent if s)
                    if any(s for _, s in self.recent) else 0.0)
        return max(slowest, per_byte * task.size)

    def time_limit(self, task: Assignment) -> float:
        """Seconds ``task`` may run unanswered on a live worker before it is sent again."""
        estimate = self._estimate(task)
        if estimate is None:
            return self.cap
        return min(self.cap, FLOOR + FACTOR * estimate)

    def _check_finished(self) -> None:
        if self.closed and not self.pending:
            self._finished.set()
