"""The map-reduce router: sockets, request dispatch, and the jobs it owns.

Runs under gevent (``zmq.green``).  Three sockets:

* ROUTER at ``zmr.req_bind``: one BSON request → one BSON reply (README, "The
  map-reduce protocol"; fields in :mod:`.jobspec`).  A ROUTER rather than a REP so
  that a ``wait: true`` request can be answered when its job ends while other
  requests are served meanwhile;
* ROUTER at ``zmr.worker_uri`` + ``src_port`` (``tasks``): each worker process
  connects a DEALER, asks for tasks and sends their replies back on it; the router
  sends a task only to a process that asked, and knows which one holds it
  (:mod:`.dispatch`);
* PULL at ``zmr.worker_uri`` + ``sink_port`` (``heartbeats``): the worker processes'
  heartbeats.

``Router(config).serve_forever()`` is all a command needs; ``start()`` /
``stop()`` let a larger process (``zcmd serve``) run it beside other greenlets.

Whatever arrives on its sockets, every request gets one reply (an ``error`` field
when it is not one the router can act on) and the loops go on: an unexpected
exception is logged with its traceback and counted (``errors`` in ``status``); should
a loop die all the same, the process stops (:mod:`zarkov.runtime.loops`).

With ``security.server_key`` set all three are CURVE servers (:mod:`zarkov.security`).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import pymongo

from zarkov import faults, runtime, security, storage, wire
from zarkov.config import Config
from zarkov.metrics.endpoint import MetricsServer
from zarkov.metrics.families import router_families
from zarkov.oneline import first_line
from zarkov.oneline import short_repr as _short
from zarkov.runtime import loops
from zarkov.zmr import jobspec
from zarkov.zmr.dispatch import Dispatcher
from zarkov.zmr.job import Job
from zarkov.zmr.jobtable import JobTable

log = logging.getLogger("zarkov.zmr.router")

TICK = 0.2                 # seconds between two looks at overdue tasks
# ZMTP heartbeats on every socket: a peer whose host vanished (a cut link sends no
# FIN) is dropped within HEARTBEAT_TIMEOUT instead of swallowing tasks for minutes.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000


class Router:
    """The map-reduce router of one process."""

    def __init__(self, config: Config):
        self.config = config
        self.zcfg = config.zmr
        self.table = JobTable()
        self._dispatcher: Dispatcher | None = None
        self.src_port = self.sink_port = 0
        self._mongo: pymongo.MongoClient | None = None
        self._sockets: list[Any] = []
        self._loops: list[gevent.Greenlet] = []
        self._reply_lock = gevent.lock.Semaphore()
        self._requests = gevent.pool.Pool(self.zcfg.request_greenlets)
        self._stopped = gevent.event.Event()
        self._started = False
        self.errors = loops.Errors(log)
        self.metrics: MetricsServer | None = None

    @property
    def mongo(self) -> pymongo.MongoClient:
        """The router's MongoDB client (created on first use)."""
        if self._mongo is None:
            self._mongo = pymongo.MongoClient(self.config.mongo_uri)
        return self._mongo

    def writes(self, database: str) -> storage.Writes:
        """How jobs write outputs into ``database`` (the server probed once per database)."""
        return storage.writes(self.mongo[database])

    # -- life cycle ---------------------------------------------------------------

    @property
    def dispatcher(self) -> Dispatcher:
        """Hands the jobs' tasks to worker processes (made when the router starts)."""
        assert self._dispatcher is not None, "the router has not started"
        return self._dispatcher

    def start(self) -> "Router":
        """Bind the sockets and start serving in background greenlets.

        Raises ConfigError when a bind address is beyond loopback without keys.
        """
        security.check_binds(self.config, ("zmr.req_bind", "zmr.worker_uri"))
        self.req = self._socket("ROUTER", "requests")
        self.req.bind(self.zcfg.req_bind)
        self.tasks = self._socket("ROUTER", "tasks")
        # Why mandatory: a send to a connection that has closed must fail (the task
        # then goes to another process), not vanish.
        self.tasks.setsockopt(wire.zmq_module().ROUTER_MANDATORY, 1)
        self.src_port = self._bind(self.tasks, self.zcfg.src_port)
        self.sink = self._socket("PULL", "heartbeats")
        self.sink_port = self._bind(self.sink, self.zcfg.sink_port)
        self._sockets = [self.req, self.tasks, self.sink]
        self._dispatcher = Dispatcher(self.tasks)
        self._loops = [loops.spawn("router: request loop", self._serve_requests),
                       loops.spawn("router: tasks loop", self._serve_tasks),
                       loops.spawn("router: sink loop", self._serve_sink),
                       loops.spawn("router: tick loop", self._tick)]
        self._started = True
        if self.config.metrics.router_port:
            self.metrics = MetricsServer(self.config, self.config.metrics.router_port,
                                         "router", self._metric_families).start()
        log.info("router: requests at %s, tasks on port %d, heartbeats on port %d%s",
                 self.zcfg.req_bind, self.src_port, self.sink_port,
                 ", CURVE on" if security.curve_on(self.config) else "")
        return self

    def _socket(self, kind: str, name: str):
        z = wire.zmq_module()
        sock = wire.context().socket(getattr(z, kind))
        sock.setsockopt(z.LINGER, 0)
        sock.setsockopt(z.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(z.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        security.secure_server(self.config, sock, name)
        return sock

    def _bind(self, sock, port: int) -> int:
        if port:
            sock.bind(f"{self.zcfg.worker_uri}:{port}")
            return port
        return sock.bind_to_random_port(self.zcfg.worker_uri)

    def stop(self) -> bool:
        """Abort running jobs (their files are removed), close the sockets."""
        if self._stopped.is_set():
            return True
        if self.metrics is not None:
            self.metrics.stop()
        running = [j.greenlet for j in self.table.running() if j.greenlet]
        gevent.killall(running, timeout=10)
        gevent.killall([g for g in self._loops if g is not gevent.getcurrent()], timeout=5)
        for s in self._sockets:
            s.close(0)
        if self._mongo is not None:
            self._mongo.close()
        self._stopped.set()
        log.info("router stopped")
        return True

    # -- loops --------------------------------------------------------------------

    def _serve_requests(self) -> None:
        while True:
            try:
                frames = self.req.recv_multipart(copy=False)
                if not security.admitted(frames[-1], "requests"):
                    continue  # a client whose key was revoked while it was connected
                frames = [f.bytes for f in frames]
            except Exception:  # noqa: BLE001 - count it, keep reading
                self.errors.record("request loop")
                gevent.sleep(0.1)  # why: no busy loop should the error persist
                continue
            faults.hit("router.loop", frames[-1])
            self._requests.spawn(self._handle, frames)

    def _serve_tasks(self) -> None:
        while True:
            try:
                self.dispatcher.on_worker(self.tasks.recv_multipart())
            except Exception:  # noqa: BLE001 - one bad message must not stop the replies
                self.errors.record("tasks loop")
                gevent.sleep(0)

    def _serve_sink(self) -> None:
        while True:
            try:
                self.dispatcher.on_sink(self.sink.recv_multipart())
            except Exception:  # noqa: BLE001 - one bad message must not stop the heartbeats
                self.errors.record("sink loop")
                gevent.sleep(0)

    def _tick(self) -> None:
        last_prune = time.monotonic()
        while True:
            gevent.sleep(TICK)
            try:
                self.dispatcher.tick()
                if time.monotonic() - last_prune > 10:
                    self.table.prune()
                    last_prune = time.monotonic()
            except Exception:  # noqa: BLE001 - the next tick tries again
                self.errors.record("tick loop")

    # -- requests -----------------------------------------------------------------

    def _reply(self, envelope: list[bytes], doc: dict) -> None:
        body = wire.encode_reply(doc)
        with self._reply_lock:
            self.req.send_multipart([*envelope, body])

    def _handle(self, frames: list[bytes]) -> None:
        envelope, body = wire.split_request(frames)
        try:
            request = wire.decode(body)
        except wire.WireError as e:
            self._reply(envelope, {"error": f"bad request: {e}"})
            return
        try:
            faults.hit("router.request", body)
            reply = self.handle(request)
        except Exception as e:  # noqa: BLE001 - one request must never stop the router
            self.errors.record("request loop", f"on {_short(request.get('$command'))}")
            reply = {"error": f"internal error: {type(e).__name__}: {first_line(e)}"}
        if isinstance(reply, _Later):  # answer when the job ends, off the pool
            gevent.spawn(self._reply_later, envelope, reply)
            return
        self._reply(envelope, reply)

    def _reply_later(self, envelope: list[bytes], later: "_Later") -> None:
        later.job.done.wait(later.timeout)
        self._reply(envelope, {"job_id": later.job.job_id, "status": later.job.status()})

    def handle(self, request: dict) -> "dict | _Later":
        """The reply to one decoded request (``_Later``: the job's status, once it has
        ended or the time given has passed)."""
        command = request.get("$command")
        if command == "echo":
            return {"message": request}
        if command == "config":
            return {**self.zcfg.as_dict(), "src_port": self.src_port, "sink_port": self.sink_port}
        if command in jobspec.JOB_COMMANDS:
            try:
                spec = jobspec.parse(command, request, self.config.mongo_database)
            except jobspec.BadRequest as e:
                return {"error": f"{command}: {e}"}
            job = Job(self, spec)
            self.table.add(job)
            job.start()
            return _Later(job) if spec.wait else {"job_id": job.job_id, "status": job.status()}
        if command == "status":
            return self._status(request)
        if command == "terminate":
            # After this reply has gone out: the process stops (zarkov.runtime), the
            # router among its components.
            gevent.spawn_later(0.1, runtime.request_stop)
            return {"ok": True, "message": "router stopping"}
        if command is None:
            return {"error": "bad request: no '$command' field"}
        return {"error": f"unknown command {_short(command)}"}

    def _metric_families(self) -> list:
        """The router's series for ``/metrics``: its own ``status`` reply."""
        reply = self._status({"recent": 0})
        return router_families(reply if isinstance(reply, dict) else None)

    def _status(self, request: dict) -> "dict | _Later":
        if "job_id" not in request:
            d = self.dispatcher
            workers = d.live_workers()
            refused = security.refusals()
            return {"workers": len(workers), "worker_pids": [pid for _, pid in workers],
                    "jobs_running": len(self.table.running()),
                    "jobs_known": len(self.table.jobs), "jobs": self.table.recent(request),
                    "jobs_by_state": self.table.by_state(),
                    "jobs_finished": self.table.tally(),
                    "errors": self.errors.total, "errors_by_loop": dict(self.errors.counts),
                    "sink_dropped": d.dropped, "worker_errors": d.worker_errors(),
                    "tasks_waiting": d.waiting(), "tasks_resent_lost": d.resent_lost,
                    "tasks_resent_for_time_limit": d.resent_for_time_limit,
                    "curve": security.curve_on(self.config),
                    "refused": sum(refused.values()), "refused_by_socket": refused}
        reply, job, wait = self.table.status_reply(request)
        return _Later(job, wait) if reply is None else reply


class _Later:
    """A reply deferred until ``job`` ends (or ``timeout`` seconds, if given)."""

    __slots__ = ("job", "timeout")

    def __init__(self, job: Job, timeout: float | None = None):
        self.job = job
        self.timeout = timeout
