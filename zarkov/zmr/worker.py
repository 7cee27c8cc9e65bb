"""One map-reduce worker process: ask for a task, run the shipped function, reply.

Run as ``python -m zarkov.zmr.worker`` by a :mod:`.pool`, which hands it the config
(:mod:`zarkov.runtime.children`).  With keys, every socket is a CURVE client.
The process is plain (no gevent) and single-threaded apart from a heartbeat thread.
It asks the router for its ports with a ``config`` request, so only ``req_uri``
needs to be known, then connects a DEALER to the router's source port (the
``tasks`` socket: tasks come in, replies go out) and PUSHes heartbeats to its sink
port.

Tasks by credit: every message on the DEALER carries ``ready: {pid, host, seen,
free}`` — the tasks received so far and how many more it could hold now (two: the
one it runs and the next, so that it never waits for work; fewer as it nears its
last).  It says so when it connects, in every reply, and every second while idle
(so that a router started again learns of it).  The router sends a task only where
there is room, so the process never receives one it did not ask for.  An empty
message from the router is a probe of the connection, and is ignored.

Task: frames ``[header, payload...]``, header ``{j: job id, t: task id, kind,
fns: {what: [text, name]}, ...}``.  Reply: ``[header, payload...]`` with
``{j, t, ok, pid, echo, ready, ...}``, or ``{ok: false, traceback}`` when the function
raised.  Heartbeat (on the sink): ``[{hb: pid, host, errors}]`` every second, so the
router knows who is alive even while a task runs long; ``[{bye: pid, host}]`` on the
DEALER after its last reply when the process recycles itself (below), so that the
router sends at once what it still holds (nothing, unless it leaves early for its
memory).  Kind ``mapreduce`` maps, reduces and finalizes a whole input that fits in
one chunk.

The process exits (and the pool replaces it) after ``--max-requests`` tasks or
when its resident memory passes ``--suicide-kib``: shipped code may leak.  Before
exiting it waits until its last reply and its goodbye have left.

A task that cannot even be read is logged with its traceback and counted (the count
travels in the heartbeat; the router's ``status`` sums it as ``worker_errors``), and
the loop goes on.  Should the loop die all the same, the process exits non-zero and
the pool starts another.
"""
from __future__ import annotations

import logging
import os
import random
import socket
import sys
import threading
import time
import traceback
from typing import Any
from urllib.parse import urlsplit

import bson
import zmq

from zarkov import errors, faults, runtime, security, wire
from zarkov.runtime import children, loops
from zarkov.security import ClientKeys
from zarkov.zmr import compute, workerstats
from zarkov.zmr.workerstats import WorkerStats

log = logging.getLogger("zarkov.zmr.worker")

HEARTBEAT_INTERVAL = 1.0
CONFIG_REFRESH = 5.0   # seconds without a word from the router before asking its ports again
ANNOUNCE_INTERVAL = 1.0  # seconds idle between two reminders to the router that we are here
WINDOW = 2             # tasks held at most: the one running and the next
LINGER_MS = 5000       # how long the last reply and the goodbye may take to leave at exit


def rss_kib() -> int:
    """Resident set size of this process in KiB (from /proc, no psutil)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def handle(frames: list[bytes], extra: dict[str, Any] | None = None) -> list[bytes]:
    """Run one task and return the reply frames; errors become ``ok: false``.

    ``extra`` goes into the reply's header (the worker's ``ready``).
    """
    base: dict[str, Any] = {"j": None, "t": None, "pid": os.getpid(), **(extra or {})}
    try:
        header = bson.decode(frames[0], wire.CODEC)
        base.update(j=header.get("j"), t=header.get("t"))
        if "echo" in header:  # the job's own bookkeeping, handed back untouched
            base["echo"] = header["echo"]
        faults.hit("worker.task", frames[0])
        fns = compute.load_functions(header["fns"])
        kind = header["kind"]
        if kind == "map":
            n, m, parts = compute.run_map(fns, frames[1], header["rc"], header.get("xmr", False))
            keys = sorted(parts)
            return [bson.encode({**base, "ok": True, "docs": n, "recs": m, "parts": keys}),
                    *(parts[p] for p in keys)]
        if kind == "mapreduce":
            n, out = compute.run_map_reduce(fns, frames[1], header.get("xmr", False),
                                            header.get("finalize", True))
            colls = list(out)
            return [bson.encode({**base, "ok": True, "docs": n, "colls": colls}),
                    *(out[c] for c in colls)]
        if kind == "reduce":
            out = compute.run_reduce(fns, frames[1], header.get("xmr", False),
                                     header.get("finalize", True))
            colls = list(out)
            return [bson.encode({**base, "ok": True, "colls": colls}), *(out[c] for c in colls)]
        if kind == "rereduce":
            data = compute.run_rereduce(fns, frames[1], frames[2], header.get("c"),
                                        header.get("finalize", True))
            return [bson.encode({**base, "ok": True}), data]
        if kind == "basic":
            result = compute.run_basic(fns, header.get("args") or [], header.get("kwargs") or {})
            return [bson.encode({**base, "ok": True, "result": result})]
        raise ValueError(f"unknown task kind {kind!r}")
    except Exception:  # noqa: BLE001 - any failure of shipped code goes back to the job
        tb = traceback.format_exc()
        log.warning("task %s of job %s failed:\n%s", base["t"], base["j"], tb)
        return [bson.encode({**base, "ok": False, "traceback": tb})]


class Worker:
    """The loop of one worker process; :meth:`run` returns the exit status."""

    def __init__(self, req_uri: str, max_requests: int = 256, suicide_kib: int = 3145728,
                 parent_pid: int | None = None, keys: ClientKeys | None = None,
                 stats: WorkerStats | None = None):
        self.req_uri = req_uri
        self.keys = keys
        self.host = urlsplit(req_uri).hostname or "127.0.0.1"
        self.hostname = socket.gethostname()
        # Why a random share of the limit: processes started together would otherwise
        # all recycle at once and leave the router without any for the second or so a
        # new one takes to start.
        self.max_requests = max(1, int(max_requests * random.uniform(0.75, 1.0)))
        self.suicide_kib = suicide_kib
        self.parent_pid = parent_pid
        self.ctx = zmq.Context()
        self.ports: tuple[int, int] | None = None
        self.sink_uri: str | None = None
        self.tasks: zmq.Socket | None = None  # to the router, once connected
        self.received = 0
        self.last_said = 0.0
        self.stopping = threading.Event()
        self.errors = loops.Errors(log)
        self.stats = stats

    def _orphaned(self) -> bool:
        return self.parent_pid is not None and children.orphaned()

    def _fetch_ports(self, timeout: float) -> tuple[int, int] | None:
        try:
            reply = wire.request(self.req_uri, {"$command": "config"}, timeout, self.keys)
            return int(reply["src_port"]), int(reply["sink_port"])
        except (wire.WireError, KeyError, TypeError, ValueError):
            return None

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        # Why heartbeats: after the router's host was cut off and came back, a silent
        # connection would never notice that the router dropped it.
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        if self.keys is not None:
            self.keys.apply(sock)
        return sock

    def _connect(self, ports: tuple[int, int]) -> None:
        if self.tasks is not None:
            self.tasks.close(0)
        self.ports = ports
        tasks = self.tasks = self._socket(zmq.DEALER)
        tasks.setsockopt(zmq.LINGER, LINGER_MS)  # let the last reply out before exit
        tasks.connect(f"tcp://{self.host}:{ports[0]}")
        self.sink_uri = f"tcp://{self.host}:{ports[1]}"
        log.info("worker %d: tasks from port %d, heartbeats to port %d of %s",
                 os.getpid(), ports[0], ports[1], self.host)
        self._announce()

    def ready(self) -> dict[str, Any]:
        """What the router needs to send this process tasks: who it is, how many it
        has received, and how many more it could hold now (between two tasks)."""
        return {"pid": os.getpid(), "host": self.hostname, "seen": self.received,
                "free": max(0, min(WINDOW, self.max_requests - self.received))}

    def _say(self, frames: list[bytes], flags: int = 0) -> None:
        assert self.tasks is not None, "not connected"
        self.tasks.send_multipart(frames, flags)
        self.last_said = time.monotonic()

    def _announce(self) -> None:
        """Tell the router how many tasks this process takes (idle, or after a task
        that could not even be answered)."""
        try:
            self._say([bson.encode({"ready": self.ready()})], zmq.NOBLOCK)
        except zmq.ZMQError:  # queue full while the router is away: said again soon
            pass

    def _heartbeat(self) -> None:
        sock: zmq.Socket | None = None
        uri: str | None = None
        while not self.stopping.wait(HEARTBEAT_INTERVAL):
            msg = bson.encode({"hb": os.getpid(), "host": self.hostname,
                               "errors": self.errors.total})
            if self.sink_uri is not None and self.sink_uri != uri:
                if sock is not None:
                    sock.close(0)
                uri = self.sink_uri
                sock = self._socket(zmq.PUSH)
                sock.setsockopt(zmq.SNDHWM, 2)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(uri)
            if sock is None:  # not connected yet
                continue
            try:
                sock.send(msg, zmq.NOBLOCK)
            except zmq.ZMQError:  # router away: heartbeats are not worth queueing
                pass
            if self.stats is not None:
                self.stats.write()
        if sock is not None:
            sock.close(0)

    def _goodbye(self) -> None:
        """Tell the router this process leaves, after its last reply: whatever it
        still holds (a task asked for before it knew it would leave) goes to another
        process at once."""
        try:
            self._say([bson.encode({"bye": os.getpid(), "host": self.hostname})], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the router notices the closed connection instead

    def _serve(self, frames: list[bytes]) -> None:
        self.received += 1
        try:
            faults.hit("worker.loop", frames[0])
            reply = handle(frames, {"ready": self.ready()})
            self._say(reply)
            if self.stats is not None:
                self.stats.task(frames[0], reply[0])
        except Exception:  # noqa: BLE001 - one task must not end the process
            self.errors.record("worker loop")
            self._announce()  # unanswered: the router must still know our room

    def run(self) -> int:
        """Serve tasks until recycled (:data:`~zarkov.errors.EXIT_RECYCLE`), orphaned or
        interrupted (0)."""
        while self.ports is None:
            ports = self._fetch_ports(2.0)
            if ports:
                self._connect(ports)
            elif self._orphaned():
                return 0
        beat = threading.Thread(target=self._heartbeat, daemon=True)
        beat.start()
        heard = time.monotonic()  # last word from the router: a task or a probe
        try:
            while True:
                tasks = self.tasks
                assert tasks is not None  # connected above, and never unset
                if tasks.poll(1000):
                    frames = tasks.recv_multipart()
                    heard = time.monotonic()
                    if frames != [b""]:  # not the router's probe: a task
                        self._serve(frames)
                        if self.received >= self.max_requests:
                            log.info("worker %d: recycled after %d tasks", os.getpid(),
                                     self.received)
                            if self.stats is not None:
                                self.stats.recycled()
                            self._goodbye()
                            return errors.EXIT_RECYCLE
                        if rss_kib() > self.suicide_kib:
                            log.info("worker %d: recycled at %d KiB RSS", os.getpid(),
                                     rss_kib())
                            if self.stats is not None:
                                self.stats.recycled()
                            self._goodbye()
                            return errors.EXIT_RECYCLE
                if self._orphaned():
                    return 0
                now = time.monotonic()
                if now - self.last_said >= ANNOUNCE_INTERVAL:
                    self._announce()
                if now - heard > CONFIG_REFRESH:
                    # A restarted router may have bound new random ports.
                    ports = self._fetch_ports(1.0)
                    if ports and ports != self.ports:
                        self._connect(ports)
                    heard = time.monotonic()
        except KeyboardInterrupt:
            return 0
        finally:
            self.stopping.set()
            if self.stats is not None:
                self.stats.write(force=True)
            beat.join(2 * HEARTBEAT_INTERVAL)
            if self.tasks is not None:
                self.tasks.close()
            # Why term: at interpreter exit pyzmq leaves the context alone, and what
            # the last send queued (the last reply, the goodbye) could be lost.
            self.ctx.term()


def main() -> int:
    """Entry point of one worker process (started by a pool: its config in the
    environment, see :mod:`zarkov.runtime.children`)."""
    config = children.child_config("<worker pool>")
    runtime.setup_logging(config)
    if children.parent_pid():
        children.die_with_parent()
    z = config.zmr
    stats = workerstats.for_this_process(config, children.parent_pid(), children.child_index())
    return Worker(z.req_uri, z.requests_per_worker_process, z.suicide_level,
                  children.parent_pid(), security.client_keys(config), stats).run()


if __name__ == "__main__":
    sys.exit(main())
