"""The event logger: ingest sockets, validation, and the processes that run them.

:class:`EventServer` is the work of one process: two PULL sockets (BSON and JSON),
each drained by a greenlet in batches (a small one waits :data:`GATHER` for more);
every message is validated (:mod:`zarkov.eventlog.schema`), the valid ones given
their positions and accepted by the process's durable
:class:`~zarkov.eventlog.intake.Intake` (one journal write per batch), the bad ones
set aside with a reason.

:class:`EventLogger` is what commands use.  With one event server it runs an
EventServer in the calling (gevent) process, bound to ``bson_bind_address`` and
``json_bind_address``.  With ``num_event_servers`` > 1 (0 = one per core) a
:class:`~zarkov.eventlog.proxy.Proxy` per socket binds the public addresses and
deals messages round-robin to N child processes (:mod:`zarkov.eventlog.child`,
kept running by :class:`zarkov.runtime.children.Children`), each with its own journal
directory ``<journal>/server-<i>``, so validation and journaling use N cores.

With ``security.server_key`` the public sockets are CURVE servers
(:mod:`zarkov.security`); refused connections are counted in the stats files.

Shared key: when ``shared_key`` is set, every message must have two frames, the key
and then the event; otherwise a message's last frame is the event.  It is a shared
password (compared in constant time), not authentication: without CURVE it travels
in clear.

Every message received is accounted for: journaled (``accepted``) or set aside with a
reason (``rejected``), whatever its bytes.  An unexpected exception while handling one
message is logged with its traceback and counted (``errors``), and the message goes to
the rejects; the loops go on.  Should a loop die all the same, the process stops and
exits non-zero (:mod:`zarkov.runtime.loops`), and its supervisor starts it again.
"""
from __future__ import annotations

import hmac
import logging
import os
import shutil
import time
from typing import Any, Callable

import gevent
import gevent.event
import zmq as zmq_plain
import zmq.green as zmq

from zarkov import config as C
from zarkov import faults, security
from zarkov.eventlog import notify
from zarkov.eventlog.intake import STATS_INTERVAL, Intake
from zarkov.eventlog.proxy import Proxy, private_dir
from zarkov.eventlog.schema import Rejected, decode_many, now_millis, prepare_bson, prepare_json
from zarkov.eventlog.stats import PROXY_STATS, Stats, read_stats, stats_path, total, write_loop
from zarkov.metrics.endpoint import MetricsServer
from zarkov.metrics.families import event_families
from zarkov.oneline import first_line as clip
from zarkov.runtime import loops
from zarkov.runtime.children import Children

SOCKET_NAMES = ("events-bson", "events-json")  # their names in zarkov.security
BATCH = 500             # most messages taken from a socket before journaling them
GATHER_BELOW = 100      # a batch smaller than this waits GATHER seconds for more
GATHER = 0.005
DRAIN_AT_STOP = 200000  # most messages still taken from the sockets when stopping
PROXY_STOP = 2.0        # seconds a proxy may take to obey TERMINATE
_plain_recv = zmq_plain.Socket.recv

log = logging.getLogger("zarkov.eventlog")


def server_dir(journal_dir: str, index: int) -> str:
    """The journal directory of event server ``index``."""
    return os.path.join(journal_dir, f"server-{index}")


def _owned_dirs(journal_dir: str, index: int, count: int) -> list[str]:
    # Why: after a change of num_event_servers, directories of servers that no longer
    # run are replayed by the server whose index they equal modulo the new count.
    out: list[str] = []
    try:
        names = os.listdir(journal_dir)
    except FileNotFoundError:
        return out
    for name in sorted(names):
        if name.startswith("server-") and name[7:].isdigit() and int(name[7:]) % count == index:
            out.append(os.path.join(journal_dir, name))
    return out


class EventServer:
    """One process's share of the event logger (use :class:`EventLogger` to run one).

    ``bson_endpoint``/``json_endpoint`` are bound when ``bind`` is true (the single
    process case), else connected to (a child behind the proxy).
    """

    def __init__(self, config: C.Config, index: int = 0, count: int = 1,
                 bson_endpoint: str | None = None, json_endpoint: str | None = None,
                 bind: bool = True):
        self.config = config
        self.index = index
        self.bson_endpoint = bson_endpoint or config.bson_bind_address
        self.json_endpoint = json_endpoint or config.json_bind_address
        self.bind = bind
        self.key = config.shared_key.encode() if config.shared_key is not None else None
        self.intake = Intake(config, server_dir(config.journal, index),
                             stats_path(config.journal, index), f"event server {index}",
                             index, _owned_dirs(config.journal, index, count))
        self.stats = self.intake.stats
        self._sockets: list[Any] = []
        self._greenlets: list[Any] = []
        #: The batch a socket loop holds while it waits for more (stop journals it).
        self._held: dict[str, list] = {}
        self._running = False

    def start(self) -> "EventServer":
        """Bind or connect the sockets, start the intake and the socket loops.

        Raises JournalBusy when another process holds the journal directory,
        zmq.ZMQError when a socket cannot be bound.
        """
        self.intake.lock()
        ctx: zmq.Context = zmq.Context.instance()
        try:
            for endpoint, prepare, source in ((self.bson_endpoint, prepare_bson, "bson"),
                                              (self.json_endpoint, prepare_json, "json")):
                sock = ctx.socket(zmq.PULL)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, 100000)
                self._sockets.append((sock, prepare, source))
                if self.bind:
                    security.secure_server(self.config, sock, f"events-{source}")
                (sock.bind if self.bind else sock.connect)(endpoint)
        except BaseException:
            for sock, _, _ in self._sockets:
                sock.close(0)
            self._sockets = []
            self.intake.unlock()
            raise
        self.intake.start(self._count_refusals if self.bind else None)
        self._running = True
        for sock, prepare, source in self._sockets:
            self._greenlets.append(loops.spawn(f"event server {self.index}: {source} loop",
                                               self._receive, sock, prepare, source))
        return self

    # -- the hot path ---------------------------------------------------------------

    def _receive(self, sock, prepare: Callable[[bytes, int], bytes], source: str) -> None:
        loop = f"{source} loop"
        while self._running:
            batch: list = []
            try:
                batch.append(sock.recv_multipart())  # waits cooperatively
                self._drain(sock, batch, BATCH)
                if len(batch) < GATHER_BELOW:
                    # Why: a batch costs the same fixed work (wake-ups, a decode call, a
                    # journal write) whatever its size; at a few thousand events a
                    # second batches of a handful cost the logger four times the CPU
                    # per event of full ones, taken from the database on a shared host.
                    # An event waits 5 ms more (the committer lingers 20 ms for others
                    # to join its insert).
                    self._held[source] = batch
                    gevent.sleep(GATHER)
                    del self._held[source]
                    self._drain(sock, batch, BATCH)
            except Exception:  # noqa: BLE001 - a socket error: count it, keep reading
                self.stats.errors.record(loop)
                gevent.sleep(0.1)  # why: no busy loop should the error persist
            if batch:
                try:
                    self._handle(batch, prepare, source)
                except Exception:  # noqa: BLE001 - _handle guards each step; a last resort
                    self.stats.errors.record(loop, f"on a batch of {len(batch)} messages")
            loops.let_others_run()  # the committer's inserts, the other socket

    @staticmethod
    def _drain(sock, batch: list, limit: int) -> None:
        # Why the plain socket's recv: messages already queued need no gevent wait, and
        # the green wrapper (and recv_multipart's RCVMORE look-ups) cost several times
        # the rest of the hot path.  The next green recv resets the socket's FD edge.
        recv = _plain_recv
        try:
            while len(batch) < limit:
                f = recv(sock, zmq.NOBLOCK, copy=False)
                frames = [f.bytes]
                while f.more:  # the rest of a multipart message is there already
                    f = recv(sock, zmq.NOBLOCK, copy=False)
                    frames.append(f.bytes)
                batch.append(frames)
        except zmq.Again:
            pass

    def _handle(self, batch: list[list[bytes]], prepare, source: str) -> None:
        """Accept the valid messages of ``batch`` (one journal write), reject the others.

        Positions are handed out and journaled under the intake's lock: the other
        socket's loop must not journal later positions of the stream first (while
        this one waits for a full disk, say)."""
        now = now_millis()
        key = self.key
        reject = self.intake.reject
        msgs = []
        for frames in batch:
            msg = frames[-1]
            if key is not None:
                if len(frames) != 2 or not hmac.compare_digest(frames[0], key):
                    reject(source, msg, "missing or wrong shared key")
                    continue
            elif len(frames) > 2:
                reject(source, msg, f"{len(frames)} frames: expected 1, "
                       "or 2 with a shared key")
                continue
            msgs.append(msg)
        decoded = decode_many(msgs) if prepare is prepare_bson else None
        with self.intake.appending() as ids:
            docs, kept = [], []
            for i, msg in enumerate(msgs):
                try:
                    faults.hit("eventlog.message", msg)
                    if decoded is None:
                        docs.append(prepare(msg, now, ids))
                    else:
                        docs.append(prepare_bson(msg, now, ids, decoded[i]))
                    kept.append(msg)
                except Rejected as e:
                    reject(source, msg, str(e))
                except Exception as e:  # noqa: BLE001 - a bug costs one message, not the loop
                    self.stats.errors.record(f"{source} loop",
                                             f"on a message of {len(msg)} bytes")
                    reject(source, msg, f"internal error: {type(e).__name__}: {clip(e)}")
            if not docs:
                return
            try:
                self.intake.append(docs, wait=True)
            except Exception as e:  # noqa: BLE001 - not journaled: keep them as rejects
                self.stats.errors.record(f"{source} loop", "while journaling")
                for msg in kept:
                    reject(source, msg, "internal error while journaling: "
                           f"{type(e).__name__}: {clip(e)}")

    def _count_refusals(self) -> None:
        self.stats.refused = sum(security.refusals(SOCKET_NAMES).values())

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop intake, journal what the sockets still hold, commit within ``timeout``.

        Returns True when everything journaled was committed.
        """
        if not self._running:
            return True
        self._running = False
        gevent.killall(self._greenlets)
        for sock, prepare, source in self._sockets:
            batch: list = self._held.pop(source, [])
            self._drain(sock, batch, DRAIN_AT_STOP)
            if batch:
                self._handle(batch, prepare, source)
            sock.close(0)
        return self.intake.stop(timeout)


class EventLogger:
    """The event logger: start it in a gevent process, stop it to flush the journal.

    >>> logger = EventLogger(config).start()   # returns at once; greenlets do the work
    >>> logger.stats()                         # {"accepted": ..., "committed": ...}
    >>> logger.stop()                          # flushes the journal, commits what it can
    """

    def __init__(self, config: C.Config):
        self.config = config
        self.count = C.worker_processes(config.num_event_servers)
        self.server: EventServer | None = None
        self.children: Children | None = None
        self._proxies: list[Proxy] = []
        self._watchers: list[Any] = []
        self._private_dir: str | None = None
        self._stopping = False
        self.stopped = gevent.event.Event()
        self.metrics: MetricsServer | None = None

    def start(self) -> "EventLogger":
        """Bind the sockets and start serving; raises zmq.ZMQError if a bind fails,
        ConfigError if an address is beyond loopback without keys, JournalBusy if
        another process holds the journal."""
        cfg = self.config
        security.check_binds(cfg, ("bson_bind_address", "json_bind_address"))
        os.makedirs(cfg.journal, exist_ok=True)
        try:
            os.unlink(os.path.join(cfg.journal, PROXY_STATS))  # a former run's
        except FileNotFoundError:
            pass
        if self.count == 1:
            self.server = EventServer(cfg).start()
        else:
            self._start_processes()
        if cfg.metrics.eventlog_port:
            self.metrics = MetricsServer(cfg, cfg.metrics.eventlog_port, "event logger",
                                         self._metric_families).start()
        log.info("event logger: BSON on %s, JSON on %s, journal %s, %d server process%s",
                 cfg.bson_bind_address, cfg.json_bind_address, cfg.journal, self.count,
                 "" if self.count == 1 else "es")
        return self

    def _start_processes(self) -> None:
        cfg = self.config
        for name in os.listdir(cfg.journal):  # stats of servers that will not run
            if name.startswith("stats-") and name[6:-5].isdigit() and int(name[6:-5]) >= self.count:
                os.unlink(os.path.join(cfg.journal, name))
        ctx = zmq_plain.Context()
        self._ctx = ctx
        self._private_dir = private_dir()
        # Children report their commits here (for the real-time loop of this process).
        self._news = notify.Receiver(f"ipc://{self._private_dir}/news")
        self._proxies = [
            Proxy(cfg, ctx, address, f"ipc://{self._private_dir}/{source}",
                  f"{source}-{os.getpid()}", f"events-{source}")
            for source, address in (("bson", cfg.bson_bind_address),
                                    ("json", cfg.json_bind_address))]
        for p in self._proxies:
            p.start(lambda: self._stopping)
        if security.curve_on(cfg):
            # Why a file of its own: the proxy's refusals happen in this process, not
            # in the servers that write stats-<i>.json.
            proxy_stats = Stats(index=-1)

            def count() -> None:
                proxy_stats.refused = sum(security.refusals(SOCKET_NAMES).values())
            self._watchers.append(loops.spawn(
                "event logger: proxy stats", write_loop,
                os.path.join(cfg.journal, PROXY_STATS), proxy_stats, STATS_INTERVAL, count))
        bson_back, json_back = (p.backend for p in self._proxies)
        self.children = Children(
            "event server", "zarkov.eventlog.child", self.count, cfg,
            args=lambda i: ["--count", str(self.count), "--bson", bson_back,
                            "--json", json_back, "--notify", self._news.uri]).start()

    def stats(self) -> dict[str, Any]:
        """Counters summed over the server processes: accepted, rejected, committed, ..."""
        if self.server is not None:
            return total([self.server.stats.as_dict()])
        snaps = [s for s in read_stats(self.config.journal) if s.get("index", 0) < self.count]
        return total(snaps)

    def _metric_families(self) -> list:
        """The event servers' series for ``/metrics`` (from their stats files, or this
        process's own counters when it is the only server)."""
        if self.server is not None:
            snaps = [{**self.server.stats.as_dict(), "alive": True}]
        else:
            snaps = [s for s in read_stats(self.config.journal) if s.get("index", 0) < self.count]
        return event_families(snaps)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop intake, flush the journal and commit what can be within ``timeout`` s."""
        if self._stopping:
            return True
        self._stopping = True
        if self.metrics is not None:
            self.metrics.stop()
        try:
            if self.server is not None:
                return self.server.stop(timeout)
            if self.children is not None:
                # The servers stop after the proxies (which hand them what is queued);
                # meanwhile none that a group signal stopped is started again.
                self.children.hold()
            for p in self._proxies:
                p.terminate()
            # libzmq 4.3.5's steerable proxy can miss TERMINATE when its servers
            # disconnect at that moment (a SIGTERM to the whole process group stops
            # them too); terminating the context below ends such a proxy.  What it
            # still held was never journaled, so nothing accepted is lost.
            until = time.monotonic() + PROXY_STOP
            missed = [p for p in self._proxies
                      if not p.join(max(0.0, until - time.monotonic()))]
            ok = self.children.stop(timeout + 5) if self.children is not None else True
            gevent.killall(self._watchers)
            self._news.close()
            security.release(self._ctx)
            self._ctx.term()
            for p in missed:
                if not p.join(5.0):
                    log.warning("event logger: proxy %s did not stop", p.control_uri)
            if self._private_dir is not None:
                shutil.rmtree(self._private_dir, ignore_errors=True)
            return ok
        finally:
            self.stopped.set()
