"""The Dask gateway: a process that answers the router's requests by running jobs on Dask.

``python -m zarkov.dask_engine.gateway --bind ipc://… --parent`` is how
:mod:`zarkov.dask_engine.link` starts it for a Zarkov process (the config in the
environment, :mod:`zarkov.runtime.children`; it exits when its stdin closes or its
parent is gone).  ``python -m zarkov.dask_engine.gateway -y zarkov.yaml`` runs one
standalone at ``zmr.req_bind`` (loopback or ipc only), for tests, benchmarks and
clients of the protocol.

Never run it under gevent: a Dask Client does not work in a monkey-patched process
(docs/dask-engine.md).

Requests (README, "The map-reduce protocol"): ``echo``, ``mapreduce``,
``xmapreduce``, ``basic`` (parsed by :mod:`zarkov.zmr.jobspec`, so the same fields
and errors), ``status`` with or without a job id (``wait``: a long poll),
``terminate``.  The request loop is one watched thread (:mod:`zarkov.runtime.loops`);
each job runs in a thread of its own (:class:`~zarkov.dask_engine.job.DaskJob`)
through one shared Dask Client, which connects in the background from the start.
Each job's summary is also written to ``dask_job`` for the web service
(:mod:`.registry`).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from typing import Any, Optional

import pymongo
import zmq

from zarkov import runtime, wire
from zarkov.config import Config
from zarkov.dask_engine import registry
from zarkov.dask_engine.link import MISSING, READY, check
from zarkov.errors import ConfigError
from zarkov.oneline import short_repr
from zarkov.runtime import children, loops
from zarkov.zmr import jobspec
from zarkov.zmr.jobtable import JobTable

log = logging.getLogger(__name__)

POLL_MS = 50
CONNECT_TIMEOUT = 10.0
PRUNE_EVERY = 10.0


class Gateway:
    """The request loop, the jobs, the Dask Client; a :class:`zarkov.runtime.Component`."""

    def __init__(self, config: Config, bind: str, announce: bool = False):
        check(config)
        self.config = config
        self.bind = bind
        self.announce = announce
        self.table = JobTable()
        self.mongo: pymongo.MongoClient = pymongo.MongoClient(config.mongo_uri)
        self.publisher = registry.Publisher(self.mongo[config.mongo_database],
                                            config.zmr.dask_scheduler)
        self.ctx: zmq.Context = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.stopping = threading.Event()
        self._waiters: list[tuple[list[bytes], Any, float]] = []
        self._client: Any = None
        self._cluster: Any = None
        self._error: Optional[Exception] = None
        self._connect_lock = threading.Lock()
        self._connected = threading.Event()
        self._loop: Optional[threading.Thread] = None

    # -- the component --------------------------------------------------------------
    def start(self) -> "Gateway":
        """Bind, connect to Dask in the background, serve requests in a watched thread."""
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.bind)
        threading.Thread(target=self._connect, name="dask connect", daemon=True).start()
        self._loop = loops.start_thread("dask gateway requests", self.serve,
                                        expected_end=self.stopping.is_set)
        if self.announce:
            print(f"{READY}{self.bind}", flush=True)
        log.info("dask gateway on %s, scheduler %s", self.bind, self.config.zmr.dask_scheduler)
        return self

    def stop(self) -> None:
        """Stop the loop; close the Dask client (and the local cluster), the socket."""
        self.stopping.set()
        if self._loop is not None:
            self._loop.join(5.0)
        for closing in (self._client, self._cluster):
            if closing is not None:
                try:
                    closing.close(timeout=10)
                except Exception:  # noqa: BLE001 - best effort at exit
                    pass
        self.sock.close(0)
        self.mongo.close()

    # -- the Dask client ----------------------------------------------------------
    def _connect(self) -> None:
        from zarkov.dask_engine import cluster
        with self._connect_lock:
            if self._client is not None:
                return
            try:
                timeout = min(CONNECT_TIMEOUT, float(self.config.zmr.max_chunk_timeout))
                self._client, self._cluster = cluster.connect(self.config, timeout)
                self._error = None
                log.info("dask gateway: connected to %s", self.config.zmr.dask_scheduler)
            except Exception as e:  # noqa: BLE001 - reported by each job that needs it
                self._error = e
            finally:
                self._connected.set()

    def client(self) -> Any:
        """The Dask Client; connects again when the last try failed (raises why not)."""
        self._connected.wait()
        if self._client is not None and self._client.status in ("closing", "closed"):
            # The scheduler went away for longer than the client tries to reconnect:
            # start afresh for this job (a run that was going has failed already).
            with self._connect_lock:
                old, self._client = self._client, None
            try:
                old.close(timeout=5)
            except Exception:  # noqa: BLE001 - it is closed or closing already
                pass
        if self._client is None:
            self._connect()
        if self._client is None:
            assert self._error is not None
            raise self._error
        return self._client

    # -- the request loop -----------------------------------------------------------
    def serve(self) -> None:
        """Answer requests until ``terminate`` or :meth:`stop`."""
        pruned = time.monotonic()
        while not self.stopping.is_set():
            if self.sock.poll(POLL_MS, zmq.POLLIN):
                try:
                    self._handle(self.sock.recv_multipart())
                except Exception:
                    log.exception("dask gateway: request failed")
            self._answer_waiters()
            try:
                self.publisher.publish(list(self.table.jobs.values()))
            except pymongo.errors.PyMongoError as e:  # the jobs go on; shown later
                log.warning("dask gateway: cannot write the jobs' status: %s", e)
            if time.monotonic() - pruned > PRUNE_EVERY:
                self.table.prune()
                pruned = time.monotonic()

    def _reply(self, envelope: list[bytes], doc: dict) -> None:
        self.sock.send_multipart([*envelope, wire.encode_reply(doc)])

    def _handle(self, frames: list[bytes]) -> None:
        envelope, body = wire.split_request(frames)
        try:
            request = wire.decode(body)
        except wire.WireError as e:
            self._reply(envelope, {"error": f"bad request: {e}"})
            return
        reply = self.handle(request, envelope)
        if reply is not None:
            self._reply(envelope, reply)

    def handle(self, request: dict, envelope: list[bytes]) -> Optional[dict]:
        """The reply to one request (None: answered later, by a waiter)."""
        from zarkov.dask_engine.job import DaskJob
        command = request.get("$command")
        if command == "echo":
            return {"message": request}
        if command in jobspec.JOB_COMMANDS:
            try:
                spec = jobspec.parse(command, request, self.config.mongo_database)
            except jobspec.BadRequest as e:
                return {"error": f"{command}: {e}"}
            z = self.config.zmr
            job = DaskJob(spec, self.client, self.config.mongo_uri, self.mongo,
                          z.map_chunk_size, z.reduce_count, z.dask_scheduler)
            self.table.add(job)
            job.start()
            if spec.wait:
                self._waiters.append((envelope, job, float("inf")))
                return None
            return {"job_id": job.job_id, "status": job.status()}
        if command == "status":
            if "job_id" not in request:
                return self._summary(request)
            reply, job, wait = self.table.status_reply(request)
            if reply is None:
                self._waiters.append((envelope, job, time.monotonic() + wait))
            return reply
        if command == "terminate":
            runtime.request_stop()
            return {"ok": True, "message": "dask gateway stopping"}
        if command is None:
            return {"error": "bad request: no '$command' field"}
        return {"error": f"unknown command {short_repr(command)}"}

    def _answer_waiters(self) -> None:
        now = time.monotonic()
        keep = []
        for envelope, job, deadline in self._waiters:
            if job.finished or now >= deadline:
                self._reply(envelope, {"job_id": job.job_id, "status": job.status()})
            else:
                keep.append((envelope, job, deadline))
        self._waiters = keep

    def _summary(self, request: dict) -> dict:
        """``status`` without a job id: workers (from the scheduler) and jobs."""
        pids: dict = {}
        address = None
        if self._client is not None and self._client.status == "running":
            try:
                pids = self._client.run(os.getpid, wait=True)
                address = self._client.scheduler.address
            except Exception:  # noqa: BLE001 - scheduler gone: no workers to show
                pids = {}
        return {"engine": "dask", "scheduler": self.config.zmr.dask_scheduler,
                "address": address, "connected": self._client is not None,
                "workers": len(pids), "worker_pids": sorted(pids.values()),
                "jobs_running": len(self.table.running()),
                "jobs_known": len(self.table.jobs), "jobs": self.table.recent(request),
                "errors": 0}


def _watch_stdin() -> None:
    """Stop when the parent's end of our stdin closes (it exited, even by SIGKILL)."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    runtime.request_stop()


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m zarkov.dask_engine.gateway",
                                description="Answer the router's protocol with Dask.")
    p.add_argument("-y", "--yaml", help="config file (else the one its parent hands over)")
    p.add_argument("--bind", help="address to answer on (default: zmr.req_bind)")
    p.add_argument("--parent", action="store_true",
                   help="started by a Zarkov process: exit when stdin closes")
    args = p.parse_args(argv)
    try:
        import dask  # noqa: F401
        import distributed  # noqa: F401
    except ImportError as e:
        print(f"{MISSING}{e}", flush=True)
        return 2
    from zarkov import config as C
    from zarkov.security import is_loopback
    try:
        config = C.load(args.yaml) if args.yaml else children.child_config("<dask gateway>")
        bind = args.bind or config.zmr.req_bind
        if not is_loopback(bind):
            raise ConfigError(f"{config.source}: the Dask gateway binds loopback or "
                              f"ipc:// only, not {bind}")
        gateway = Gateway(config, bind, announce=True)
    except ConfigError as e:
        print(f"zarkov dask gateway: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    runtime.setup_logging(config)
    if args.parent and not config.verbose:
        # Its parent (zcmd aggregate under cron, say) prints what a run did; the
        # gateway's own lines would only repeat it.
        logging.getLogger().setLevel(logging.WARNING)
    if args.parent:
        threading.Thread(target=_watch_stdin, name="parent's pipe", daemon=True).start()
    return runtime.run([lambda: gateway], "dask gateway")


if __name__ == "__main__":
    sys.exit(main())
