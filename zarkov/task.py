"""Task: the base class of aggregation logic (README, "Using it": the API of the 2011 design).

Users subclass :class:`Task`, override ``_start_jobs(self, socket, full)`` and start
map-reduce jobs from it with :meth:`Task.start_mr` (or :meth:`Task.start_xmr`,
:meth:`Task.start_basic_job`); :meth:`Task.run` calls ``_start_jobs`` and waits for
every job it started::

    class MyTask(Task):
        def _start_jobs(self, socket, full):
            db = M.doc_session.db
            self.start_mr(socket, db.zagg.my_agg, full, map=map, reduce=reduce)

Run by ``zcmd aggregate`` (:mod:`zarkov.aggregation`), a Task gets a
:class:`RunContext`: its jobs read only the run's events (:attr:`Task.selection`:
in an incremental run the positions it takes and the events without a position it
marked with its lock id ``self._lock_id``, in a full run every event stored up to
now) and write into staging
collections (or, when small, hand their output back in memory) that the engine
later applies to the real targets exactly once.  Without a context (a Task run by
hand) jobs write straight to their targets, as the 2011 design did: ``replace`` when
``full``, else ``reduce``.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional, Union

import bson
from pymongo.collection import Collection

from zarkov import wire
from zarkov.errors import JobFailed, ZarkovError
from zarkov.zmr import jobclient


class TaskError(ZarkovError):
    """A Task that cannot start its jobs (bad arguments, unshippable function)."""




class RunContext:
    """What the aggregation engine tells a Task about the run in progress.

    It chooses the lock id the jobs filter on and the staging collections they write
    to, and records each job's output so that the engine can apply it afterwards.
    """

    def __init__(self, lock_id: str, attempt: int, staging_prefix: str,
                 on_started: Optional[Callable[[], None]] = None,
                 progress: Optional[Callable[[dict], None]] = None,
                 selection: Optional[dict] = None, inline_max: int = 0,
                 inputs: Optional[list[str]] = None):
        self.lock_id = lock_id
        self.attempt = attempt
        self.staging_prefix = staging_prefix
        self.outputs: list[dict] = []
        self.on_started = on_started
        self.progress = progress
        #: The filter of the run's documents (default: those marked with ``lock_id``).
        self.selection = selection if selection is not None else {"jobs": lock_id}
        #: Outputs up to this many bytes come back in the job's status (0: never).
        self.inline_max = inline_max
        #: The collections the run's documents are in (None: the AggDef's input).
        self.inputs = list(inputs) if inputs else None

    def stage(self, kind: str, target: str, reduce_text: str, reduce_name: str,
              finalize: bool) -> str:
        """Allocate the staging name for one job's output and record the output.

        ``kind`` is ``mr`` (``target`` is a collection name; the result is a
        collection name) or ``xmr`` (``target`` is an output prefix; the result is a
        staging prefix).
        """
        n = len(self.outputs)
        staging = (f"{self.staging_prefix}{n}" if kind == "mr"
                   else f"{self.staging_prefix}x{n}.")
        self.outputs.append({"kind": kind, "target": target, "staging": staging,
                             "reduce_text": reduce_text, "reduce_name": reduce_name,
                             "finalize": finalize})
        return staging

    def started(self, job_id: Any) -> None:
        """The job of the output staged last was accepted as ``job_id``."""
        self.outputs[-1]["job_id"] = job_id


def _collection_name(collection: Union[Collection, str]) -> str:
    if isinstance(collection, Collection):
        return collection.name
    if isinstance(collection, str) and collection:
        return collection
    raise TaskError(f"output collection must be a pymongo Collection or a name, "
                    f"got {collection!r}")


def _check_filter(filter: Any, kind: str) -> None:
    # Why: map given in filter's place (start_mr(socket, coll, full, map, reduce))
    # would otherwise fail deep in the query encoding with "not iterable".
    if filter is None or isinstance(filter, Mapping):
        return
    what = (f"function '{getattr(filter, '__name__', '?')}'" if callable(filter)
            else type(filter).__name__)
    form = ("start_mr(socket, collection, full, filter=None, map=None, reduce=None, "
            "map_name=None, reduce_name=None)" if kind == "mr"
            else "start_xmr(socket, full, filter=None, map=None, reduce=None, ...)")
    raise TaskError(f"filter must be a query document or None, got {what}: the "
                    f"arguments are {form}; give map and reduce by keyword")


def _check_name(what: str, func: Any, name: Optional[str]) -> None:
    # Why: a function's source defines its own name; another *_name would only fail
    # on the worker ("does not define a function named ...") after the run started.
    fname = getattr(func, "__name__", None)
    if callable(func) and name and fname and fname != "<lambda>" and name != fname:
        raise TaskError(f"{what}_name '{name}' is not the name of the {what} function "
                        f"'{fname}' (a *_name goes with source text; leave it out "
                        f"for a function)")


class Task:
    """Base class of aggregation tasks; subclasses override :meth:`_start_jobs`.

    ``agg_def`` is the :class:`zarkov.model.AggDef` being run (its ``object`` names
    the input collection), ``config`` the Zarkov config (router address, database,
    time limits) and ``context`` the engine's :class:`RunContext`, if any.
    """

    def __init__(self, agg_def: Any = None, config: Any = None,
                 context: Optional[RunContext] = None):
        if config is None:
            from zarkov import config as C
            config = C.from_dict({})
        self.agg_def = agg_def
        self.config = config
        self._context = context
        #: Lock id marking the run's documents not yet counted: ``{"jobs": self._lock_id}``
        #: selects exactly the documents of an incremental run (see :attr:`selection`).
        self._lock_id: Optional[str] = context.lock_id if context else None
        self._jobs: list[dict] = []
        #: Results of basic jobs, by job id, once :meth:`run` has returned.
        self.results: dict[Any, Any] = {}

    # -- to override -------------------------------------------------------------
    def _start_jobs(self, socket: Any, full: bool) -> None:
        """Start this task's jobs with start_mr/start_xmr/start_basic_job."""
        raise NotImplementedError("_start_jobs")

    # -- helpers for _start_jobs --------------------------------------------------
    @property
    def input_name(self) -> str:
        """The input collection: the AggDef's ``object`` (``event`` by default)."""
        return getattr(self.agg_def, "object", None) or "event"

    @property
    def input_names(self) -> list[str]:
        """The collections the run's documents are in: the input collection and, for
        ``event``, the rotated collections that exist (older events move there)."""
        if self._context is not None and self._context.inputs:
            return list(self._context.inputs)
        return [self.input_name]

    @property
    def selection(self) -> Optional[dict]:
        """The filter of this run's documents (None without a run context).

        Incremental: the ranges of positions the run takes, ``{_id: {$gt: …, $lte:
        …}}`` per event stream (:mod:`zarkov.positions`), and the documents without
        a position it marked, ``{"jobs": self._lock_id}``.  Full: every position
        stored, the documents marked, and those already counted by their flag
        (``aggregates``).  Several clauses are joined with ``$or``.
        """
        return self._context.selection if self._context is not None else None

    def _query(self, filter: Optional[dict]) -> bytes:
        """The job's filter as BSON: the run's selection ANDed with the user's filter.

        A ``{"jobs": self._lock_id}`` in the user's filter (the 2011 design's way of
        selecting a run's documents) is the selection already: it is left out, so
        that it means exactly the run's documents, positioned or marked, in every
        kind of run.
        """
        clauses = []
        if self.selection is not None:
            clauses.append(self.selection)
        if filter:
            user = dict(filter)
            if self._lock_id is not None and user.get("jobs") == self._lock_id:
                del user["jobs"]
            if user:
                clauses.append(user)
        query = {} if not clauses else clauses[0] if len(clauses) == 1 else {"$and": clauses}
        return bson.encode(query)

    def _submit(self, socket: Any, request: dict, kind: str, target: Optional[str]) -> Any:
        timeout = float(self.config.zmr.max_chunk_timeout)
        try:
            job_id = jobclient.submit(socket, request, timeout)
        except wire.RouterTimeout as e:
            raise JobFailed(str(e)) from None
        except jobclient.ZmrError as e:
            raise JobFailed(f"the router refused the {kind} job: {e}") from None
        self._jobs.append({"job_id": job_id, "kind": kind, "target": target, "status": {}})
        return job_id

    def start_mr(self, socket: Any, collection: Union[Collection, str], full: bool,
                 filter: Optional[dict] = None, map: Any = None, reduce: Any = None,
                 map_name: Optional[str] = None, reduce_name: Optional[str] = None,
                 finalize: Any = None, finalize_name: Optional[str] = None) -> Any:
        """Start a map-reduce job from the input collection into ``collection``.

        The article's signature, positional or keyword: ``start_mr(socket,
        collection, full, filter=None, map=None, reduce=None, map_name=None,
        reduce_name=None)``; ``finalize``/``finalize_name`` come after it.
        ``map``/``reduce``/``finalize`` are module-level functions (shipped as source)
        or source text with the matching ``*_name``.  Returns the job id.
        """
        target = _collection_name(collection)
        return self._start_mapreduce(socket, "mr", target, full, filter, map, reduce,
                                     map_name, reduce_name, finalize, finalize_name)

    def start_xmr(self, socket: Any, full: bool, filter: Optional[dict] = None,
                  map: Any = None, reduce: Any = None, map_name: Optional[str] = None,
                  reduce_name: Optional[str] = None, finalize: Any = None,
                  finalize_name: Optional[str] = None, output_prefix: str = "") -> Any:
        """Start a job whose map yields ``{c, k, v}`` documents: one output per ``c``.

        The output collection of ``c`` is ``output_prefix + c``; ``reduce`` is
        ``reduce(c, key, values)``.  Returns the job id.
        """
        return self._start_mapreduce(socket, "xmr", output_prefix, full, filter, map,
                                     reduce, map_name, reduce_name, finalize, finalize_name)

    def _start_mapreduce(self, socket: Any, kind: str, target: str, full: bool,
                         filter: Optional[dict], map: Any, reduce: Any,
                         map_name: Optional[str], reduce_name: Optional[str],
                         finalize: Any, finalize_name: Optional[str]) -> Any:
        """Build and send a mapreduce (``mr``) or xmapreduce (``xmr``) request."""
        _check_filter(filter, kind)
        for what, func, name in (("map", map, map_name), ("reduce", reduce, reduce_name),
                                 ("finalize", finalize, finalize_name)):
            _check_name(what, func, name)
        try:
            request = jobclient.mapreduce_request(
                map, reduce, finalize, query=self._query(filter), xmr=kind == "xmr",
                map_name=map_name, reduce_name=reduce_name, finalize_name=finalize_name,
                database=self.config.mongo_database, input_names=self.input_names)
        except jobclient.BadFunction as e:
            raise TaskError(str(e)) from None
        out_field = "output_name" if kind == "mr" else "output_prefix"
        if self._context is not None:
            # Always fresh collections of their own (or the output in memory, when
            # small); the engine applies them later.
            request[out_field] = self._context.stage(
                kind, target, request["reduce_text"], request["reduce_name"],
                finalize is not None)
            request["output_type"] = "replace"
            if self._context.inline_max:
                request["inline_max"] = self._context.inline_max
            job_id = self._submit(socket, request, request["$command"], target)
            self._context.started(job_id)
            return job_id
        request[out_field] = target
        request["output_type"] = "replace" if full else "reduce"
        return self._submit(socket, request, request["$command"], target)

    def start_basic_job(self, socket: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``func(*args, **kwargs)`` on a worker; its result lands in ``self.results``."""
        try:
            request = jobclient.basic_request(func, *args, **kwargs)
        except jobclient.BadFunction as e:
            raise TaskError(str(e)) from None
        return self._submit(socket, request, "basic", None)

    # -- running --------------------------------------------------------------------
    def run(self, socket: Any, full: bool = False) -> int:
        """Start the jobs, wait for all of them; return the documents they read."""
        self._jobs = []
        self.results = {}
        self._start_jobs(socket, full)
        if self._context is not None and self._context.on_started:
            self._context.on_started()
        return self.wait(socket)

    def wait(self, socket: Any) -> int:
        """Wait until every started job is complete; return the documents they read.

        Raises JobFailed when a job fails, when the router forgets a job (it was
        restarted) or does not answer within ``zmr.max_chunk_timeout``, and when no
        job makes progress for twice that long (no worker is serving the router).
        """
        timeout = float(self.config.zmr.max_chunk_timeout)
        started = time.monotonic()
        by_id = {j["job_id"]: j for j in self._jobs}

        def progress(statuses: dict) -> None:
            for job_id, st in statuses.items():
                by_id[job_id]["status"] = st
            self._report(started)

        try:
            final = jobclient.wait(socket, list(by_id), on_progress=progress,
                                stall=2 * timeout, request_timeout=timeout)
        except wire.RouterTimeout as e:
            raise JobFailed(str(e)) from None
        except jobclient.JobError as e:
            job = by_id[e.job_id]
            raise JobFailed(f"{job['kind']} job into {job['target'] or '-'} failed: "
                            f"{jobclient.last_line(e.traceback)}", e.traceback) from None
        except jobclient.Stalled:
            raise JobFailed(f"no job progress for {2 * timeout:g} s "
                            f"(are workers connected to {self.config.zmr.req_uri}?)") from None
        except jobclient.ZmrError as e:
            raise JobFailed(str(e)) from None
        for job_id, st in final.items():
            if by_id[job_id]["kind"] == "basic":
                self.results[job_id] = st.get("result")
        return self.docs_read()

    def job_statuses(self) -> dict[Any, dict]:
        """The latest status of each job started so far, by job id."""
        return {j["job_id"]: j["status"] for j in self._jobs}

    def docs_read(self) -> int:
        """Documents read by the map-reduce jobs started so far."""
        return sum(int(j["status"].get("docs_read") or 0) for j in self._jobs
                   if j["kind"] != "basic")

    def _report(self, started: float) -> None:
        if self._context is None or self._context.progress is None:
            return
        phases = [j["status"].get("state") or "?" for j in self._jobs
                  if j["status"].get("state") != "complete"]
        self._context.progress({"phase": phases[0] if phases else "complete",
                                "docs": self.docs_read(),
                                "elapsed": time.monotonic() - started})
