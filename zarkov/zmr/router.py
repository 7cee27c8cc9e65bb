"""The map-reduce router: sockets, request dispatch, and the jobs it owns.

Runs under gevent (``zmq.green``).  Three sockets:

* ROUTER at ``zmr.req_bind``: one BSON request → one BSON reply (SPEC §4).  A
  ROUTER rather than a REP so that a ``wait: true`` request can be answered when
  its job ends while other requests are served meanwhile;
* PUSH at ``zmr.worker_uri`` + ``src_port``: tasks to worker processes;
* PULL at ``zmr.worker_uri`` + ``sink_port``: replies and heartbeats.

``Router(config).serve_forever()`` is all a command needs; ``start()`` /
``stop()`` let a larger process (``zcmd serve``) run it beside other greenlets.
With ``security.server_key`` set all three are CURVE servers (:mod:`zarkov.security`).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import bson
import gevent
import gevent.event
import gevent.lock
import gevent.pool
import pymongo

from zarkov import security, wire
from zarkov.config import Config
from zarkov.zmr import commit, jobspec
from zarkov.zmr.dispatch import Dispatcher
from zarkov.zmr.job import Job

log = logging.getLogger("zarkov.zmr.router")

TICK = 0.2                 # seconds between two looks at overdue tasks
# ZMTP heartbeats on every socket: a peer whose host vanished (a cut link sends no
# FIN) is dropped within HEARTBEAT_TIMEOUT instead of swallowing tasks for minutes.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000
KEEP_FINISHED = 3600.0     # seconds a finished job's status stays available
MAX_FINISHED = 1000        # finished jobs remembered at most


class Router:
    """The map-reduce router of one process."""

    def __init__(self, config: Config):
        self.config = config
        self.zcfg = config.zmr
        self.jobs: dict[str, Job] = {}
        self.dispatcher: Dispatcher | None = None
        self.src_port = self.sink_port = 0
        self._mongo: pymongo.MongoClient | None = None
        self._sockets: list[Any] = []
        self._loops: list[gevent.Greenlet] = []
        self._reply_lock = gevent.lock.Semaphore()
        self._requests = gevent.pool.Pool(self.zcfg.request_greenlets)
        self._stopped = gevent.event.Event()
        self._started = False
        self._rename_ok: dict[str, bool] = {}
        self._swap: bool | None = None

    @property
    def mongo(self) -> pymongo.MongoClient:
        """The router's MongoDB client (created on first use)."""
        if self._mongo is None:
            self._mongo = pymongo.MongoClient(self.config.mongo_uri)
        return self._mongo

    @property
    def swaps_documents(self) -> bool:
        """Whether outputs are overwritten by delete + insert (see commit.py)."""
        if self._swap is None:
            self._swap = commit.swaps_documents(self.mongo)
        return self._swap

    def can_rename(self, database: str) -> bool:
        """Whether ``replace`` can build aside and rename (probed once per database)."""
        if database not in self._rename_ok:
            self._rename_ok[database] = commit.can_rename_over(self.mongo, database)
        return self._rename_ok[database]

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> "Router":
        """Bind the sockets and start serving in background greenlets.

        Raises ConfigError when a bind address is beyond loopback without keys.
        """
        security.check_binds(self.config, ("zmr.req_bind", "zmr.worker_uri"))
        self.req = self._socket("ROUTER", "requests")
        self.req.bind(self.zcfg.req_bind)
        push = self._socket("PUSH", "tasks")
        # Tasks wait here, not in a dead worker's queue.
        push.setsockopt(wire.zmq_module().SNDHWM, 1)
        self.src_port = self._bind(push, self.zcfg.src_port)
        self.sink = self._socket("PULL", "results")
        self.sink_port = self._bind(self.sink, self.zcfg.sink_port)
        self._sockets = [self.req, push, self.sink]
        self.dispatcher = Dispatcher(push)
        self._loops = [gevent.spawn(self._serve_requests), gevent.spawn(self._serve_sink),
                       gevent.spawn(self._tick)]
        self._started = True
        log.info("router: requests at %s, tasks on port %d, replies on port %d%s",
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

    def serve_forever(self) -> None:
        """Start if needed and block until ``stop()`` or a ``terminate`` request."""
        if not self._started:
            self.start()
        self._stopped.wait()

    def stop(self) -> None:
        """Abort running jobs (their files are removed), close the sockets."""
        if self._stopped.is_set():
            return
        running = [j.greenlet for j in self.jobs.values() if j.greenlet and not j.finished]
        gevent.killall(running, timeout=10)
        gevent.killall([g for g in self._loops if g is not gevent.getcurrent()], timeout=5)
        for s in self._sockets:
            s.close(0)
        if self._mongo is not None:
            self._mongo.close()
        self._stopped.set()
        log.info("router stopped")

    # -- loops --------------------------------------------------------------------

    def _serve_requests(self) -> None:
        while True:
            frames = self.req.recv_multipart(copy=False)
            if not security.admitted(frames[-1], "requests"):
                continue  # a client whose key was revoked while it was connected
            self._requests.spawn(self._handle, [f.bytes for f in frames])

    def _serve_sink(self) -> None:
        while True:
            self.dispatcher.on_message(self.sink.recv_multipart())

    def _tick(self) -> None:
        last_prune = time.monotonic()
        while True:
            gevent.sleep(TICK)
            self.dispatcher.tick()
            if time.monotonic() - last_prune > 10:
                self._prune()
                last_prune = time.monotonic()

    def _prune(self) -> None:
        done = sorted((j for j in self.jobs.values() if j.finished), key=lambda j: j.ended)
        now = time.time()
        for i, job in enumerate(done):
            if now - job.ended > KEEP_FINISHED or len(done) - i > MAX_FINISHED:
                del self.jobs[job.job_id]

    # -- requests -----------------------------------------------------------------

    def _reply(self, envelope: list[bytes], doc: dict) -> None:
        try:
            body = bson.encode(doc)
        except Exception as e:  # noqa: BLE001 - e.g. a basic job's result echoed back
            body = bson.encode({"error": f"reply not BSON-encodable: {e}"})
        with self._reply_lock:
            self.req.send_multipart([*envelope, body])

    def _handle(self, frames: list[bytes]) -> None:
        # REQ peers put an empty delimiter (after a correlation id) before the body.
        try:
            split = frames.index(b"") + 1
        except ValueError:
            split = 1
        envelope, body = frames[:split], frames[split] if split < len(frames) else b""
        try:
            request = wire.decode(body)
        except wire.WireError as e:
            self._reply(envelope, {"error": f"bad request: {e}"})
            return
        try:
            reply = self.handle(request)
        except Exception as e:  # noqa: BLE001 - one request must never stop the router
            log.exception("request %r failed", request.get("$command"))
            reply = {"error": f"{type(e).__name__}: {e}"}
        if isinstance(reply, Job):  # wait: answer when the job ends, off the pool
            gevent.spawn(self._reply_when_done, envelope, reply)
            return
        self._reply(envelope, reply)

    def _reply_when_done(self, envelope: list[bytes], job: Job) -> None:
        job.done.wait()
        self._reply(envelope, {"job_id": job.job_id, "status": job.status()})

    def handle(self, request: dict) -> "dict | Job":
        """The reply to one decoded request (a Job: reply when it ends)."""
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
            self.jobs[job.job_id] = job
            job.start()
            return job if spec.wait else {"job_id": job.job_id, "status": job.status()}
        if command == "status":
            return self._status(request)
        if command == "terminate":
            gevent.spawn_later(0.1, self.stop)  # after this reply has gone out
            return {"ok": True, "message": "router stopping"}
        if command is None:
            return {"error": "bad request: no '$command' field"}
        return {"error": f"unknown command {command!r}"}

    def _status(self, request: dict) -> dict:
        if "job_id" not in request:
            workers = self.dispatcher.live_workers()
            refused = security.refusals()
            return {"workers": len(workers), "worker_pids": [pid for _, pid in workers],
                    "jobs_running": sum(1 for j in self.jobs.values() if not j.finished),
                    "jobs_known": len(self.jobs), "curve": security.curve_on(self.config),
                    "refused": sum(refused.values()), "refused_by_socket": refused}
        job_id = request["job_id"]
        job = self.jobs.get(str(job_id))
        if job is None:
            return {"job_id": job_id, "status": {"state": "UNKNOWN"},
                    "error": f"unknown job id {job_id!r}"}
        return {"job_id": job.job_id, "status": job.status()}
