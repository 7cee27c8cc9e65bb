"""The event logger: ingest sockets, validation, rejects, and the processes that run them.

:class:`EventServer` is the work of one process: two PULL sockets (BSON and JSON),
each drained by a greenlet in batches; every message is validated
(:mod:`zarkov.eventlog.schema`), the valid ones appended to the journal in one write
per batch, the bad ones set aside (:mod:`zarkov.eventlog.rejects`); a commit
greenlet (:mod:`zarkov.eventlog.committer`) moves the journal into MongoDB.

:class:`EventLogger` is what commands use.  With one event server it runs an
EventServer in the calling (gevent) process, bound to ``bson_bind_address`` and
``json_bind_address``.  With ``num_event_servers`` > 1 (0 = one per core) a ZeroMQ
proxy in native threads binds the public addresses and deals messages round-robin
to N child processes (``python -m zarkov.eventlog.child``), each with its own
journal directory ``<journal>/server-<i>``, so validation and journaling use N cores.
The proxy reaches its children over ``ipc://`` sockets in a private (0700) temporary
directory: no other local user can connect to them and pull events.

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
exits non-zero (:mod:`zarkov.supervise`), and the event logger's parent starts it
again.
"""
from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import gevent
import gevent.event
import pymongo
import pymongo.errors
from pymongo.write_concern import WriteConcern
import zmq as zmq_plain
import zmq.green as zmq

from zarkov import config as C
from zarkov import faults, security, supervise
from zarkov.children import child_env
from zarkov.eventlog import journal as J
from zarkov.eventlog import notify
from zarkov.eventlog.committer import Committer
from zarkov.eventlog.rejects import RejectLog, rejects_path
from zarkov.eventlog.schema import Rejected, now_millis, prepare_bson, prepare_json
from zarkov.eventlog.stream import JournalBusy
from zarkov.eventlog.stats import (PROXY_STATS, Stats, read_stats, stats_path, total,
                                   write_loop, write_stats)
from zarkov.oneline import first_line as clip

SOCKET_NAMES = ("events-bson", "events-json")  # their names in zarkov.security
BATCH = 100             # most messages taken from a socket before journaling them
DRAIN_AT_STOP = 200000  # most messages still taken from the sockets when stopping
STATS_INTERVAL = 0.1
PROXY_STOP = 2.0        # seconds a proxy may take to obey TERMINATE
_plain_recv = zmq_plain.Socket.recv

log = logging.getLogger("zarkov.eventlog")


def server_dir(journal_dir: str, index: int) -> str:
    """The journal directory of event server ``index``."""
    return os.path.join(journal_dir, f"server-{index}")


def _owned_dirs(journal_dir: str, index: int, count: int) -> list[str]:
    # Why: after a change of num_event_servers, directories of servers that no longer
    # run are replayed by the server whose index they equal modulo the new count.
    out = []
    try:
        names = os.listdir(journal_dir)
    except FileNotFoundError:
        return out
    for name in sorted(names):
        if name.startswith("server-") and name[7:].isdigit() and int(name[7:]) % count == index:
            out.append(os.path.join(journal_dir, name))
    return out


def mongo_collection(config: C.Config):
    """The ``event`` collection, with acknowledged writes whatever the URI says."""
    client = pymongo.MongoClient(config.mongo_uri, serverSelectionTimeoutMS=2000,
                                 connectTimeoutMS=2000, socketTimeoutMS=120000)
    coll = client[config.mongo_database]["event"]
    if not coll.write_concern.acknowledged:
        coll = coll.with_options(write_concern=WriteConcern(w=1))
    return client, coll


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
        self.count = count
        self.bson_endpoint = bson_endpoint or config.bson_bind_address
        self.json_endpoint = json_endpoint or config.json_bind_address
        self.bind = bind
        self.stats = Stats(index)
        self.key = config.shared_key.encode() if config.shared_key is not None else None
        os.makedirs(config.journal, exist_ok=True)
        self.rejects = RejectLog(rejects_path(config.journal), self.stats)
        self.journal = J.Journal(server_dir(config.journal, index), config.journal_file_size)
        self._sockets: list[Any] = []
        self._greenlets: list[Any] = []
        self._running = False
        self.client = None
        self.committer: Committer | None = None

    def start(self) -> "EventServer":
        """Lock the journal, bind or connect the sockets, replay, start the greenlets.

        Raises JournalBusy when another process holds the journal directory,
        zmq.ZMQError when a socket cannot be bound.
        """
        replay = [p for d in _owned_dirs(self.config.journal, self.index, self.count)
                  for p in J.list_files(d)]
        self.journal.open()
        ctx = zmq.Context.instance()
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
        except zmq.ZMQError:
            for sock, _, _ in self._sockets:
                sock.close(0)
            self._sockets = []
            self.journal.close()
            raise
        self.client, coll = mongo_collection(self.config)
        gevent.spawn(self._connect)
        self.committer = Committer(coll, self.journal, replay, self.stats, self.rejects)
        self.committer.start()
        self._running = True
        for sock, prepare, source in self._sockets:
            self._greenlets.append(supervise.spawn(f"event server {self.index}: {source} loop",
                                                   self._receive, sock, prepare, source))
        self._stats_greenlet = supervise.spawn(f"event server {self.index}: stats loop",
                                               self._write_stats_loop)
        write_stats(stats_path(self.config.journal, self.index), self.stats)
        return self

    def _connect(self) -> None:
        # Why: discover the server and open a connection before the first burst, whose
        # receive loop would otherwise delay the first commit by a second or so.
        try:
            self.client.admin.command("ping")
        except Exception as e:  # noqa: BLE001 - only a warning: the committer retries
            log.warning("the database does not answer yet (%s); events are journaled", e)

    # -- the hot path ---------------------------------------------------------------

    def _receive(self, sock, prepare: Callable[[bytes, int], bytes], source: str) -> None:
        loop = f"{source} loop"
        while self._running:
            batch: list = []
            try:
                batch.append(sock.recv_multipart())  # waits cooperatively
                self._drain(sock, batch, BATCH)
            except Exception:  # noqa: BLE001 - a socket error: count it, keep reading
                self.stats.errors.record(loop)
                gevent.sleep(0.1)  # why: no busy loop should the error persist
            if batch:
                try:
                    self._handle(batch, prepare, source)
                except Exception:  # noqa: BLE001 - _handle guards each step; a last resort
                    self.stats.errors.record(loop, f"on a batch of {len(batch)} messages")
            gevent.sleep(0)  # why: let the committer and the other socket run

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
        """Journal the valid messages of ``batch`` (one write), reject the others.

        Positions are handed out and journaled under the journal's lock: the other
        socket's loop must not journal later positions of the stream first (while
        this one waits for a full disk, say)."""
        with self.journal.appending:
            self._journal(batch, prepare, source)

    def _journal(self, batch: list[list[bytes]], prepare, source: str) -> None:
        now = now_millis()
        key = self.key
        ids = self.journal.stream
        records = []
        kept = []
        frame = J.frame
        for frames in batch:
            msg = frames[-1]
            if key is not None:
                if len(frames) != 2 or not hmac.compare_digest(frames[0], key):
                    self.rejects.add(source, msg, "missing or wrong shared key")
                    continue
            elif len(frames) > 2:
                self.rejects.add(source, msg, f"{len(frames)} frames: expected 1, "
                                 "or 2 with a shared key")
                continue
            try:
                faults.hit("eventlog.message", msg)
                records.append(frame(prepare(msg, now, ids)))
                kept.append(msg)
            except Rejected as e:
                self.rejects.add(source, msg, str(e))
            except Exception as e:  # noqa: BLE001 - a bug must cost one message, not the loop
                self.stats.errors.record(f"{source} loop", f"on a message of {len(msg)} bytes")
                self.rejects.add(source, msg, f"internal error: {type(e).__name__}: {clip(e)}")
        while records:
            try:
                self.journal.append(records, len(records))
            except OSError as e:
                # Why wait rather than drop: these events were taken off the socket;
                # meanwhile ZeroMQ queues the next ones and then pushes back on senders.
                log.error("cannot write the journal (%s); retrying in a second", e)
                gevent.sleep(1.0)
                continue
            except Exception as e:  # noqa: BLE001 - not journaled: keep them as rejects
                self.stats.errors.record(f"{source} loop", "while journaling")
                for msg in kept:
                    self.rejects.add(source, msg, "internal error while journaling: "
                                     f"{type(e).__name__}: {clip(e)}")
                return
            self.stats.accepted += len(records)
            break

    # -- housekeeping ---------------------------------------------------------------

    def _write_stats_loop(self) -> None:
        write_loop(stats_path(self.config.journal, self.index), self.stats, STATS_INTERVAL,
                   self._count_refusals if self.bind else None)

    def _count_refusals(self) -> None:
        self.stats.refused = sum(security.refusals(SOCKET_NAMES).values())

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop intake, journal what the sockets still hold, commit within ``timeout``.

        Returns True when everything journaled was committed.
        """
        if not self._running:
            return True
        self._running = False
        deadline = time.monotonic() + timeout
        gevent.killall(self._greenlets)
        for sock, prepare, source in self._sockets:
            batch: list = []
            self._drain(sock, batch, DRAIN_AT_STOP)
            if batch:
                self._handle(batch, prepare, source)
            sock.close(0)
        self.journal.close()
        ok = self.committer.stop(max(1.0, deadline - time.monotonic()))
        self._stats_greenlet.kill()
        self.stats.backlog_files = len(self.committer.backlog)
        try:
            write_stats(stats_path(self.config.journal, self.index), self.stats)
        except OSError as e:
            log.error("cannot write the stats file: %s", e)
        self.client.close()
        s = self.stats
        log.info("event server %d stopped: accepted %d, rejected %d, committed %d%s",
                 self.index, s.accepted, s.rejected, s.committed,
                 "" if ok else "; the rest stays in the journal for the next start")
        return ok


class _Proxy:
    """A ZeroMQ PULL → PUSH proxy in a native thread (it never touches gevent).

    ``frontend`` is the public address; ``backend`` the ipc:// address its children
    connect to.
    """

    def __init__(self, config: C.Config, ctx, frontend: str, backend: str, name: str,
                 socket_name: str):
        self.ctx = ctx
        self.front = ctx.socket(zmq_plain.PULL)
        self.front.setsockopt(zmq_plain.LINGER, 0)
        security.secure_server(config, self.front, socket_name)
        self.front.bind(frontend)
        self.back = ctx.socket(zmq_plain.PUSH)
        self.back.bind(backend)
        self.backend = backend
        self.control_uri = f"inproc://zarkov-eventlog-{name}"
        self.control = ctx.socket(zmq_plain.PAIR)
        self.control.bind(self.control_uri)
        self.result = None

    def start(self, stopping: Callable[[], bool]) -> None:
        """Run the proxy in a thread of gevent's pool; its end before ``stopping()``
        is a dead loop (the process stops, see :mod:`zarkov.supervise`)."""
        self.result = gevent.get_hub().threadpool.spawn(self._run)

        def ended(result) -> None:
            if not stopping():
                supervise.loop_died(f"event logger: proxy {self.control_uri}",
                                    result.exception)
        # rawlink runs in the hub: hand the report to a greenlet.
        self.result.rawlink(lambda result: gevent.spawn(ended, result))

    def _run(self) -> None:
        try:
            zmq_plain.proxy_steerable(self.front, self.back, None, self.control)
        finally:
            self.front.close(0)
            # Why a linger: hand what is queued to the servers before they stop.
            self.back.close(2000)
            self.control.close(0)

    def terminate(self) -> None:
        """Ask the proxy to end: it stops taking messages from its public socket."""
        sock = self.ctx.socket(zmq_plain.PAIR)
        sock.connect(self.control_uri)
        sock.send(b"TERMINATE")
        sock.close(1000)

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the proxy's thread to end; whether it did."""
        if self.result is None:
            return True
        try:
            self.result.get(timeout=timeout)
        except gevent.Timeout:
            return False
        except Exception:  # noqa: BLE001 - it ended (with ETERM, say): that is all we ask
            pass
        return True


PRIVATE_PREFIX = "zarkov-eventlog-"


def _remove_stale_private_dirs() -> None:
    """Remove the ipc directories of event loggers that died without cleaning up."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        pid = name[len(PRIVATE_PREFIX):].split("-", 1)[0]
        if not (name.startswith(PRIVATE_PREFIX) and pid.isdigit()):
            continue
        path = os.path.join(tmp, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


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
        self._proxies: list[_Proxy] = []
        self._children: dict[int, subprocess.Popen] = {}
        self._watchers: list[Any] = []
        self._private_dir: str | None = None
        self._stopping = False
        self.stats_errors = supervise.Errors(log)
        self.stopped = gevent.event.Event()

    def start(self) -> "EventLogger":
        """Bind the sockets and start serving; raises zmq.ZMQError if a bind fails,
        ConfigError if an address is beyond loopback without keys."""
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
        # Why ipc in a private directory: a loopback TCP port between the proxy and
        # its children would let any local user connect and pull events.
        _remove_stale_private_dirs()
        self._private_dir = tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-")
        # Children report their commits here (for the real-time loop of this process).
        self._news = notify.Receiver(f"ipc://{self._private_dir}/news")
        self._proxies = [
            _Proxy(cfg, ctx, address, f"ipc://{self._private_dir}/{source}",
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
            self._watchers.append(supervise.spawn(
                "event logger: proxy stats", write_loop,
                os.path.join(cfg.journal, PROXY_STATS), proxy_stats, STATS_INTERVAL, count))
        for i in range(self.count):
            self._spawn(i)
            self._watchers.append(supervise.spawn(f"event logger: watcher of server {i}",
                                                  self._watch, i))

    def _spawn(self, index: int) -> None:
        data = self.config.as_dict()
        data.pop("source", None)
        env = child_env(ZARKOV_EVENTLOG_CONFIG=json.dumps(data))
        argv = [sys.executable, "-m", "zarkov.eventlog.child", "--index", str(index),
                "--count", str(self.count), "--bson", self._proxies[0].backend,
                "--json", self._proxies[1].backend, "--parent", str(os.getpid()),
                "--notify", self._news.uri]
        self._children[index] = subprocess.Popen(argv, env=env)

    def _watch(self, index: int) -> None:
        while not self._stopping:
            try:
                code = self._children[index].wait()
                if self._stopping:
                    return
                log.error("event server %d exited with status %s; starting it again",
                          index, code)
                gevent.sleep(1.0)
                if not self._stopping:
                    self._spawn(index)
            except Exception:  # noqa: BLE001 - e.g. no memory to fork: try again
                self.stats_errors.record(f"watcher of server {index}")
                gevent.sleep(1.0)

    def stats(self) -> dict[str, Any]:
        """Counters summed over the server processes: accepted, rejected, committed, ..."""
        if self.server is not None:
            return total([self.server.stats.as_dict()])
        snaps = [s for s in read_stats(self.config.journal) if s.get("index", 0) < self.count]
        return total(snaps)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop intake, flush the journal and commit what can be within ``timeout`` s."""
        if self._stopping:
            return True
        self._stopping = True
        try:
            if self.server is not None:
                return self.server.stop(timeout)
            for p in self._proxies:
                p.terminate()
            # libzmq 4.3.5's steerable proxy can miss TERMINATE when its servers
            # disconnect at that moment (a SIGTERM to the whole process group stops
            # them too); terminating the context below ends such a proxy.  What it
            # still held was never journaled, so nothing accepted is lost.
            until = time.monotonic() + PROXY_STOP
            missed = [p for p in self._proxies
                      if not p.join(max(0.0, until - time.monotonic()))]
            for p in self._children.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout + 5
            ok = True
            for p in self._children.values():
                try:
                    ok = p.wait(timeout=max(0.1, deadline - time.monotonic())) == 0 and ok
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    ok = False
            gevent.killall(self._watchers)
            self._news.close()
            security.release(self._ctx)
            self._ctx.term()
            for p in missed:
                if not p.join(5.0):
                    log.warning("event logger: proxy %s did not stop", p.control_uri)
            shutil.rmtree(self._private_dir, ignore_errors=True)
            return ok
        finally:
            self.stopped.set()


def run_until_signal(config: C.Config) -> int:
    """Run the event logger until SIGTERM or SIGINT, then stop it; the exit status."""
    stop = gevent.event.Event()
    handlers = [gevent.signal_handler(s, stop.set) for s in (signal.SIGTERM, signal.SIGINT)]
    supervise.on_death(stop.set)
    try:
        logger = EventLogger(config).start()
    except zmq.ZMQError as e:
        log.error("cannot bind the event logger's sockets: %s", e)
        return 1
    except JournalBusy as e:
        log.error("cannot start the event logger: %s", e)
        return 1
    stop.wait()
    for h in handlers:
        h.cancel()
    log.info("stopping the event logger")
    return supervise.exit_status(0 if logger.stop() else 3)


def child_main(argv: list[str]) -> int:
    """A server process behind the proxy (started by EventLogger, not by hand)."""
    p = argparse.ArgumentParser()
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--bson", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--notify", default=None, help="where to report commits (the parent)")
    args = p.parse_args(argv)
    config = C.from_dict(json.loads(os.environ["ZARKOV_EVENTLOG_CONFIG"]), "<event logger>")
    logging.basicConfig(
        level=logging.DEBUG if config.verbose else logging.INFO,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    stop = gevent.event.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(s, stop.set)

    def orphan_watch() -> None:
        # Why: a parent killed with SIGKILL cannot stop us; journal and exit then.
        while os.getppid() == args.parent:
            gevent.sleep(1.0)
        log.warning("event server %d: the event logger is gone; stopping", args.index)
        stop.set()

    supervise.on_death(stop.set)
    if args.notify:
        notify.Forwarder(args.notify)
    server = EventServer(config, args.index, args.count, args.bson, args.json, bind=False)
    try:
        server.start()
    except JournalBusy as e:
        log.error("event server %d: %s", args.index, e)
        return 1
    gevent.spawn(orphan_watch)
    stop.wait()
    return supervise.exit_status(0 if server.stop() else 3)
