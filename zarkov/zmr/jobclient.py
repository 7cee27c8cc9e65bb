"""For those who submit jobs: build requests, submit, ask status, wait.

The requests are those of README "The map-reduce protocol" (their fields:
:mod:`.jobspec`).  Every function takes a REQ socket from :func:`connect` (or
:func:`zarkov.wire.req_socket`) connected to ``zmr.req_uri``; a router that does not
answer makes them raise :class:`zarkov.wire.RouterTimeout` (its message names the
URI) within ``request_timeout`` seconds.  Example::

    sock = jobclient.connect(config)   # zmr.req_uri, with the config's CURVE keys
    job_id = jobclient.submit(sock, jobclient.mapreduce_request(my_map, my_reduce,
                                                                output_name="zagg.x"))
    jobclient.wait(sock, [job_id], timeout=600)

:class:`zarkov.task.Task` builds its requests and waits for its jobs with these same
functions.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import bson

from zarkov import functions, security, wire
from zarkov.config import Config
from zarkov.errors import ZarkovError

FINAL_STATES = ("complete", "error")

#: Seconds one ``status`` request of ``wait`` may wait at the router for its job to
#: end (a long poll: the router answers as soon as the job ends).
LONG_POLL = 0.5

#: A function to ship: a module-level function, or its source text (then its name
#: must be given too).
Shippable = Union[Callable[..., Any], str]


class ZmrError(ZarkovError):
    """The router refused a request (its ``error`` reply) or a job failed."""


class BadFunction(ZmrError, ValueError):
    """A function that cannot be shipped to workers (the message says why)."""


class JobError(ZmrError):
    """A job ended in state ``error``; ``status`` is its status document."""

    def __init__(self, job_id: str, status: Mapping[str, Any]):
        super().__init__(f"job {job_id} failed: {last_line(status.get('traceback'))}",
                         status.get("traceback"))
        self.job_id = job_id
        self.status = dict(status)


class JobLost(ZmrError):
    """The router does not know the job (any more): it was restarted."""

    def __init__(self, job_id: str):
        super().__init__(f"the router does not know job {job_id} any more "
                         f"(was it restarted?)")
        self.job_id = job_id


class WaitTimeout(ZmrError):
    """Jobs still running when ``wait`` reached its deadline."""


class Stalled(ZmrError):
    """No job made any progress for ``stall`` seconds (no worker serving the router?)."""


def last_line(traceback: Optional[str]) -> str:
    """The last line of a traceback (the exception), or ``no traceback``."""
    lines = (traceback or "").strip().splitlines()
    return lines[-1] if lines else "no traceback"


# -- requests ------------------------------------------------------------------------
def connect(where: "Config | str", keys: "security.ClientKeys | None" = None):
    """A REQ socket to the router: ``where`` is a Config (its ``zmr.req_uri`` and
    CURVE keys) or a URI (with ``keys`` when the router uses CURVE)."""
    if isinstance(where, Config):
        return wire.req_socket(where.zmr.req_uri, keys=keys or security.client_keys(where))
    return wire.req_socket(where, keys=keys)


def shipped(func: Optional[Shippable], what: str, name: Optional[str] = None) -> dict[str, str]:
    """``{<what>_text, <what>_name}`` of a function or of source text named ``name``."""
    if func is None:
        raise BadFunction(f"a {what} function is required")
    if callable(func):
        try:
            text, fname = functions.source_of(func)
        except functions.FunctionError as e:
            raise BadFunction(f"{what}: {e}") from None
        return {f"{what}_text": text, f"{what}_name": name or fname}
    if isinstance(func, str):
        if not name:
            raise BadFunction(f"{what} given as source text needs {what}_name")
        return {f"{what}_text": func, f"{what}_name": name}
    raise BadFunction(f"{what} must be a function or source text, got {type(func).__name__}")


def mapreduce_request(map: Shippable, reduce: Shippable,
                      finalize: Optional[Shippable] = None, *,
                      query: Union[Mapping[str, Any], bytes, None] = None, xmr: bool = False,
                      map_name: Optional[str] = None, reduce_name: Optional[str] = None,
                      finalize_name: Optional[str] = None, **fields: Any) -> dict[str, Any]:
    """A ``mapreduce`` (``xmapreduce`` when ``xmr``) request shipping these functions.

    ``query`` is a filter document (or its BSON).  ``fields`` adds or overrides
    request fields: ``database``, ``input_names``, ``output_name``, ``output_type``,
    ``output_prefix``, ``wait``.
    """
    if not isinstance(query, bytes):
        query = bson.encode(dict(query or {}))
    request = {"$command": "xmapreduce" if xmr else "mapreduce", "query": query,
               **shipped(map, "map", map_name), **shipped(reduce, "reduce", reduce_name)}
    if finalize is not None:
        request.update(shipped(finalize, "finalize", finalize_name))
    return {**request, **fields}


def basic_request(func: Shippable, *args: Any, func_name: Optional[str] = None,
                  **kwargs: Any) -> dict[str, Any]:
    """A ``basic`` request: run ``func(*args, **kwargs)`` on a worker."""
    return {"$command": "basic", **shipped(func, "func", func_name), "args": list(args),
            "kwargs": kwargs}


# -- calls ---------------------------------------------------------------------------
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


def status(sock, job_id: str, timeout: float = 10.0, wait: float = 0.0) -> dict[str, Any]:
    """The job's status document: ``{state, phase, docs_read, ...}``.

    A job the router does not know has state ``UNKNOWN``.  With ``wait`` (seconds),
    the router answers when the job ends, or after ``wait`` if it is still running.
    """
    request: dict[str, Any] = {"$command": "status", "job_id": job_id}
    if wait:
        request["wait"] = wait
    reply = wire.call(sock, request, timeout, held=wait)
    st = reply.get("status")
    if not isinstance(st, dict):
        raise ZmrError(f"status: {reply.get('error', 'reply without a status')}")
    return st


def wait(sock, job_ids: Iterable[str], timeout: Optional[float] = None,
         on_progress: Optional[Callable[[dict[str, dict[str, Any]]], None]] = None,
         raise_on_error: bool = True, *, stall: Optional[float] = None,
         request_timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    """Poll until every job has ended; return {job_id: final status}.

    The one waiter of Zarkov (``Task`` uses it too):

    * ``timeout``: a deadline in seconds (None: none); WaitTimeout after it;
    * ``stall``: Stalled when no job's status changed for that long (a router with
      no worker never fails a job, it just waits);
    * ``raise_on_error``: JobError as soon as any job ends in ``error`` (fail fast,
      without waiting for the others); else errors are returned like completions;
    * JobLost when the router does not know a job (restarted), whatever the mode;
    * ``on_progress(statuses)`` after each round of polls, with the latest status
      of every job (the ended ones too);
    * a basic job's result is its final status's ``result``.

    Each round asks the router about the first pending job with a long poll (it
    answers as soon as that job ends, or after :data:`LONG_POLL` seconds), then
    about the others: no sleeping between rounds, no round trip wasted on a job
    that has not moved.
    """
    ids = list(job_ids)
    latest: dict[str, dict[str, Any]] = {}
    pending = list(ids)
    deadline = None if timeout is None else time.monotonic() + timeout
    last_change, last_seen = time.monotonic(), None
    while True:
        for i, job_id in enumerate(list(pending)):
            wait_here = 0.0
            if i == 0:
                wait_here = LONG_POLL
                if deadline is not None:
                    wait_here = max(0.0, min(wait_here, deadline - time.monotonic()))
            st = status(sock, job_id, request_timeout, wait_here)
            latest[job_id] = st
            state = st.get("state")
            if state == "UNKNOWN" or state is None:
                raise JobLost(job_id)
            if state in FINAL_STATES:
                pending.remove(job_id)
                if state == "error" and raise_on_error:
                    raise JobError(job_id, st)
        if on_progress is not None:
            on_progress({j: latest[j] for j in ids})
        if not pending:
            return {j: latest[j] for j in ids}
        now = time.monotonic()
        seen = [{k: v for k, v in latest[j].items() if k != "elapsed"} for j in ids]
        if seen != last_seen:
            last_seen, last_change = seen, now
        elif stall is not None and now - last_change > stall:
            raise Stalled(f"no job progress for {stall:g} s: {', '.join(pending)}")
        if deadline is not None and now > deadline:
            raise WaitTimeout(f"jobs still running after {timeout:g} s: {', '.join(pending)}")


def run(sock, request: Mapping[str, Any], timeout: Optional[float] = None,
        on_progress: Optional[Callable[[dict[str, dict[str, Any]]], None]] = None
        ) -> dict[str, Any]:
    """Submit one job and wait for it; return its final status (JobError on error)."""
    job_id = submit(sock, request)
    return wait(sock, [job_id], timeout, on_progress)[job_id]
