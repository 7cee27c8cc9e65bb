"""For those who submit jobs: build requests, submit, ask status, wait.

Every function takes a REQ socket from :func:`connect` (or
:func:`zarkov.wire.req_socket`) connected to ``zmr.req_uri``; a router that does not
answer makes them raise :class:`zarkov.wire.RouterTimeout` (its message names the
URI) within ``timeout`` seconds.  Example::

    sock = client.connect(config)   # zmr.req_uri, with the CURVE keys of the config
    job_id = client.submit(sock, client.mapreduce_request(my_map, my_reduce,
                                                          output_name="zagg.x"))
    client.wait(sock, [job_id], timeout=600)
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping

import bson

from zarkov import functions, security, wire
from zarkov.config import Config

FINAL_STATES = ("complete", "error")


class ZmrError(Exception):
    """The router refused a request (its ``error`` reply) or a job failed."""


class JobError(ZmrError):
    """A job ended in state ``error``; ``status`` is its status document."""

    def __init__(self, job_id: str, status: Mapping[str, Any]):
        tb = (status.get("traceback") or "").strip()
        super().__init__(f"job {job_id} failed: {tb.splitlines()[-1] if tb else 'no traceback'}")
        self.job_id = job_id
        self.status = dict(status)


class WaitTimeout(ZmrError):
    """Jobs still running when ``wait`` gave up."""


def connect(where: "Config | str", keys: "security.ClientKeys | None" = None):
    """A REQ socket to the router: ``where`` is a Config (its ``zmr.req_uri`` and
    CURVE keys) or a URI (with ``keys`` when the router uses CURVE)."""
    if isinstance(where, Config):
        return wire.req_socket(where.zmr.req_uri, keys=keys or security.client_keys(where))
    return wire.req_socket(where, keys=keys)


def _ship(func: Callable[..., Any] | None, what: str) -> dict[str, str]:
    if func is None:
        return {}
    text, name = functions.source_of(func)
    return {f"{what}_text": text, f"{what}_name": name}


def mapreduce_request(map: Callable[..., Any], reduce: Callable[..., Any],
                      finalize: Callable[..., Any] | None = None, *,
                      query: Mapping[str, Any] | None = None, xmr: bool = False,
                      **fields: Any) -> dict[str, Any]:
    """A ``mapreduce`` (``xmapreduce`` when ``xmr``) request shipping these functions.

    ``fields`` adds or overrides request fields: ``database``, ``input_names``,
    ``output_name``, ``output_type``, ``output_prefix``, ``wait``.
    """
    return {"$command": "xmapreduce" if xmr else "mapreduce",
            "query": bson.encode(dict(query or {})),
            **_ship(map, "map"), **_ship(reduce, "reduce"), **_ship(finalize, "finalize"),
            **fields}


def basic_request(func: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A ``basic`` request: run ``func(*args, **kwargs)`` on a worker."""
    return {"$command": "basic", **_ship(func, "func"), "args": list(args), "kwargs": kwargs}


def call(sock, request: Mapping[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One request; raises ZmrError when the reply carries ``error``."""
    reply = wire.call(sock, request, timeout)
    if "error" in reply:
        raise ZmrError(f"{request.get('$command')}: {reply['error']}")
    return reply


def submit(sock, request: Mapping[str, Any], timeout: float = 10.0) -> str:
    """Submit a job request; return its job id (without waiting for the job)."""
    request = {k: v for k, v in request.items() if k != "wait"}
    return call(sock, request, timeout)["job_id"]


def status(sock, job_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The job's status document: ``{state, phase, docs_read, ...}``."""
    return call(sock, {"$command": "status", "job_id": job_id}, timeout)["status"]


def wait(sock, job_ids: Iterable[str], timeout: float | None = None,
         on_progress: Callable[[str, dict[str, Any]], None] | None = None,
         interval: float = 0.2, raise_on_error: bool = True) -> dict[str, dict[str, Any]]:
    """Poll until every job has ended; return {job_id: final status}.

    ``on_progress(job_id, status)`` is called at each poll of a running job.
    Raises WaitTimeout after ``timeout`` seconds (None: no limit), and JobError
    for the first job that ended in ``error`` when ``raise_on_error``.
    """
    pending = list(job_ids)
    final: dict[str, dict[str, Any]] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for job_id in list(pending):
            st = status(sock, job_id)
            if st.get("state") in FINAL_STATES:
                final[job_id] = st
                pending.remove(job_id)
            elif on_progress is not None:
                on_progress(job_id, st)
        if not pending:
            break
        if deadline is not None and time.monotonic() > deadline:
            raise WaitTimeout(f"jobs still running after {timeout:g} s: {', '.join(pending)}")
        time.sleep(interval)
    if raise_on_error:
        for job_id, st in final.items():
            if st.get("state") == "error":
                raise JobError(job_id, st)
    return final


def run(sock, request: Mapping[str, Any], timeout: float | None = None,
        on_progress: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Submit one job and wait for it; return its final status (JobError on error)."""
    job_id = submit(sock, request)
    return wait(sock, [job_id], timeout, on_progress)[job_id]
