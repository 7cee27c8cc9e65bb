"""One map-reduce worker process: receive a task, run the shipped function, reply.

Run as ``python -m zarkov.zmr.worker --req-uri URI [--server-key FILE --client-key
FILE]``; :mod:`.pool` starts these.  With keys, every socket is a CURVE client.
The process is plain (no gevent) and single-threaded apart from a heartbeat thread.
It asks the router for its ports with a ``config`` request, so only ``req_uri``
needs to be known, then PULLs tasks from the router's source port and PUSHes
replies to its sink port.

Task: frames ``[header, payload...]``, header ``{j: job id, t: task id, kind,
fns: {what: [text, name]}, ...}``.  Reply: ``[header, payload...]`` with
``{j, t, ok, pid, echo, ...}``, or ``{ok: false, traceback}`` when the function raised.
Heartbeat: ``[{hb: pid, host}]`` every second, so the router knows who is there;
``[{bye: pid, host}]`` when the process recycles itself (below), so that the router
sends again soon a task that was queued here.  Kind ``mapreduce`` maps, reduces and
finalizes a whole input that fits in one chunk.

The process exits (and the pool replaces it) after ``--max-requests`` tasks or
when its resident memory passes ``--suicide-kib``: shipped code may leak.

A task that cannot even be read is logged with its traceback and counted (the count
travels in the heartbeat; the router's ``status`` sums it as ``worker_errors``), and
the loop goes on.  Should the loop die all the same, the process exits non-zero and
the pool starts another.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any
from urllib.parse import urlsplit

import bson
import zmq

from zarkov import faults, supervise, wire
from zarkov.security import ClientKeys
from zarkov.zmr import compute

log = logging.getLogger("zarkov.zmr.worker")

HEARTBEAT_INTERVAL = 1.0
CONFIG_REFRESH = 5.0  # seconds idle before asking the router for its ports again


def rss_kib() -> int:
    """Resident set size of this process in KiB (from /proc, no psutil)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (best effort)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the getppid() check in the loop still works
        pass


def handle(frames: list[bytes]) -> list[bytes]:
    """Run one task and return the reply frames; errors become ``ok: false``."""
    base: dict[str, Any] = {"j": None, "t": None, "pid": os.getpid()}
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
                 parent_pid: int | None = None, keys: ClientKeys | None = None):
        self.req_uri = req_uri
        self.keys = keys
        self.host = urlsplit(req_uri).hostname or "127.0.0.1"
        # Why a random share of the limit: processes started together, fed round
        # robin, would otherwise all recycle at once and leave the router without
        # any for the second or so a new one takes to start.
        self.max_requests = max(1, int(max_requests * random.uniform(0.75, 1.0)))
        self.suicide_kib = suicide_kib
        self.parent_pid = parent_pid
        self.ctx = zmq.Context()
        self.ports: tuple[int, int] | None = None
        self.sink_uri: str | None = None
        self.pull = self.push = None
        self.stopping = threading.Event()
        self.errors = supervise.Errors(log)

    def _orphaned(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def _fetch_ports(self, timeout: float) -> tuple[int, int] | None:
        try:
            reply = wire.request(self.req_uri, {"$command": "config"}, timeout, self.keys)
            return int(reply["src_port"]), int(reply["sink_port"])
        except (wire.WireError, KeyError, TypeError, ValueError):
            return None

    def _socket(self, kind: int):
        sock = self.ctx.socket(kind)
        # Why heartbeats: after the router's host was cut off and came back, a silent
        # PULL connection would never notice that the router dropped it.
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        if self.keys is not None:
            self.keys.apply(sock)
        return sock

    def _connect(self, ports: tuple[int, int]) -> None:
        for s in (self.pull, self.push):
            if s is not None:
                s.close(0)
        self.ports = ports
        self.pull = self._socket(zmq.PULL)
        # One task at a time: what a busy process would queue, another may take.
        self.pull.setsockopt(zmq.RCVHWM, 1)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.connect(f"tcp://{self.host}:{ports[0]}")
        self.push = self._socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 5000)  # let the last reply out before exit
        self.sink_uri = f"tcp://{self.host}:{ports[1]}"
        self.push.connect(self.sink_uri)
        log.info("worker %d: tasks from port %d, replies to port %d of %s",
                 os.getpid(), ports[0], ports[1], self.host)

    def _heartbeat(self) -> None:
        sock, uri = None, None
        while not self.stopping.wait(HEARTBEAT_INTERVAL):
            msg = bson.encode({"hb": os.getpid(), "host": socket.gethostname(),
                               "errors": self.errors.total})
            if self.sink_uri != uri:
                if sock is not None:
                    sock.close(0)
                uri = self.sink_uri
                sock = self._socket(zmq.PUSH)
                sock.setsockopt(zmq.SNDHWM, 2)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(uri)
            try:
                sock.send(msg, zmq.NOBLOCK)
            except zmq.ZMQError:  # router away: heartbeats are not worth queueing
                pass
        if sock is not None:
            sock.close(0)

    def _goodbye(self) -> None:
        """Tell the router this process leaves: a task it pushed here after the last
        one is lost, and the router sends such tasks again soon instead of after
        their time limit."""
        try:
            self.push.send(bson.encode({"bye": os.getpid(), "host": socket.gethostname()}),
                           zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the time limits still apply

    def run(self) -> int:
        """Serve tasks until recycled, orphaned or interrupted."""
        while self.ports is None:
            ports = self._fetch_ports(2.0)
            if ports:
                self._connect(ports)
            elif self._orphaned():
                return 0
        threading.Thread(target=self._heartbeat, daemon=True).start()
        served, idle_since = 0, time.monotonic()
        try:
            while True:
                if self.pull.poll(1000):
                    try:
                        frames = self.pull.recv_multipart()
                        faults.hit("worker.loop", frames[0])
                        self.push.send_multipart(handle(frames))
                    except Exception:  # noqa: BLE001 - one task must not end the process
                        self.errors.record("worker loop")
                    served += 1
                    idle_since = time.monotonic()
                    if served >= self.max_requests:
                        log.info("worker %d: recycled after %d tasks", os.getpid(), served)
                        self._goodbye()
                        return 0
                    if rss_kib() > self.suicide_kib:
                        log.info("worker %d: recycled at %d KiB RSS", os.getpid(), rss_kib())
                        self._goodbye()
                        return 0
                    continue
                if self._orphaned():
                    return 0
                if time.monotonic() - idle_since > CONFIG_REFRESH:
                    # A restarted router may have bound new random ports.
                    ports = self._fetch_ports(1.0)
                    if ports and ports != self.ports:
                        self._connect(ports)
                    idle_since = time.monotonic()
        except KeyboardInterrupt:
            return 0
        finally:
            self.stopping.set()
            for s in (self.pull, self.push):
                if s is not None:
                    s.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of one worker process."""
    p = argparse.ArgumentParser(description="one Zarkov map-reduce worker process")
    p.add_argument("--req-uri", required=True, help="the router's zmr.req_uri")
    p.add_argument("--max-requests", type=int, default=256)
    p.add_argument("--suicide-kib", type=int, default=3145728)
    p.add_argument("--parent-pid", type=int, default=None)
    p.add_argument("--server-key", help="the router's public key file (CURVE)")
    p.add_argument("--client-key", help="this worker's secret key file (CURVE)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    if args.parent_pid:
        _die_with_parent()
    keys = None
    if args.server_key or args.client_key:
        if not (args.server_key and args.client_key):
            p.error("--server-key and --client-key go together")
        try:
            keys = ClientKeys.load(args.server_key, args.client_key)
        except ValueError as e:
            p.error(str(e))
    return Worker(args.req_uri, args.max_requests, args.suicide_kib, args.parent_pid,
                  keys).run()


if __name__ == "__main__":
    sys.exit(main())
