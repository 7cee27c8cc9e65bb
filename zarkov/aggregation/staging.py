"""Staging: the Task's jobs write into collections of the run's own, never into the
targets (docs/exactly-once.md, state ``running``).

Names are ``zstage.<run_id>.<attempt>.<n>`` (an xmapreduce job: the prefix
``zstage.<run_id>.<attempt>.x<n>.``).  A resumed run starts a new attempt, so jobs
of a killed attempt still running in the router write only into collections that
nobody reads and that the run drops.

An incremental run's output is usually small (the keys of a few new events): up to
:data:`INLINE_MAX` bytes, the router hands it back in the job's status instead of
writing it (``inline_max``), and the run keeps it in its record — no collection is
created or dropped.  Larger outputs go to the staging collections as above.

REQ sockets to the router are kept between runs of one process (:func:`socket`).
"""
from __future__ import annotations

import logging
import time
import traceback
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import bson
from bson.binary import Binary
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo.errors import PyMongoError

from zarkov import security, wire
from zarkov.aggregation import records
from zarkov.aggregation.scope import STAGING_PREFIX, Scope, StepFailed
from zarkov.lease import LeaseLost
from zarkov.task import JobFailed, RunContext, TaskError
from zarkov.zmr import jobclient

log = logging.getLogger(__name__)

#: Prefix of the staging collections of every run.
PREFIX = STAGING_PREFIX
#: Bytes of output (all of a run's jobs together, and again of after-images) kept
#: in the run record rather than in collections; well below MongoDB's 16 MB.
INLINE_MAX = 256 * 1024
#: Bytes a run record may hold of inline outputs and after-images together.
RECORD_BUDGET = 4 << 20
#: Seconds between two sweeps of leftover staging collections in one process.
SWEEP_EVERY = 300.0

_idle_sockets: dict[tuple, list] = {}
_swept: dict[tuple, float] = {}


def names(scope: Scope, run_id: str) -> list[str]:
    """Existing staging collections of one run (every attempt)."""
    prefix = f"{PREFIX}{run_id}."
    return [c for c in scope.db.list_collection_names() if c.startswith(prefix)]


def drop(scope: Scope, run_id: str) -> None:
    """Drop every staging collection of one run."""
    for c in names(scope, run_id):
        scope.db.drop_collection(c)


def sweep(scope: Scope, live_run_ids, force: bool = False) -> None:
    """Drop staging collections that belong to no run record (left by a crash).

    Done at a process's first run in a database, then every :data:`SWEEP_EVERY`
    seconds (or when ``force``): a run drops its own staging collections, so only a
    crash at the wrong moment or a job of a killed attempt ending late leaves any.
    ``live_run_ids`` is called AFTER the names are listed: a staging collection is
    created only after its run record, so one listed with no record found
    afterwards belongs to a run that is over.
    """
    key = (id(scope.db.client), scope.db.name)
    now = time.monotonic()
    if not force and key in _swept and now - _swept[key] < SWEEP_EVERY:
        return
    _swept[key] = now
    found = [c for c in scope.db.list_collection_names() if c.startswith(PREFIX)]
    if not found:
        return
    live = live_run_ids()
    for c in found:
        if c[len(PREFIX):].split(".", 1)[0] not in live:
            log.info("dropping leftover staging collection %s", c)
            scope.db.drop_collection(c)


@contextmanager
def socket(config: Any) -> Iterator[Any]:
    """A REQ socket to the router of ``config`` (``zmr.req_uri``, CURVE keys), kept
    for the next run of this process; with ``zmr.engine: dask``, to this process's
    Dask gateway (:mod:`zarkov.dask_engine.link`), which answers the same requests.

    A socket whose request failed is closed rather than kept (its reply may still
    come).  Under gevent each greenlet takes its own from the idle ones.
    """
    if config.zmr.engine == "dask":
        from zarkov.dask_engine import link
        with link.socket(config) as sock:
            yield sock
        return
    keys = security.client_keys(config)
    key = (config.zmr.req_uri, wire.zmq_module().__name__, keys)
    with wire.pooled_socket(_idle_sockets.setdefault(key, []),
                            lambda: jobclient.connect(config, keys=keys)) as sock:
        yield sock


def run_jobs(scope: Scope, agg: Any, task_cls: type, record: dict,
             attempt: int) -> tuple[list[dict], int]:
    """Run the Task's jobs of one attempt into fresh staging; return its outputs and
    the most documents one of its map-reduce jobs read.

    Each output is ``{kind, target, staging, reduce_text, reduce_name, finalize,
    applied: False}`` plus ``inline`` (the documents, concatenated BSON) when the
    router handed them back; an xmapreduce job gives one per collection it wrote.
    """
    run_id = record["run_id"]
    full = record["full"]
    context = RunContext(run_id, attempt, f"{PREFIX}{run_id}.{attempt}.",
                         on_started=lambda: scope.hook("running"),
                         progress=lambda s: scope.report(f"jobs: {s['phase']}", s["docs"]),
                         selection=records.selection(record, scope.name),
                         inline_max=0 if full else INLINE_MAX, inputs=scope.inputs)
    task = task_cls(agg, scope.config, context)
    try:
        with socket(scope.config) as sock:
            task.run(sock, full)
    except (JobFailed, TaskError, wire.WireError, LeaseLost, PyMongoError):
        raise
    except NotImplementedError:
        raise StepFailed(f"{type(task).__name__}._start_jobs is not implemented",
                         bad_definition=True) from None
    except Exception as e:  # noqa: BLE001 - the user's _start_jobs raised
        raise StepFailed(f"{type(task).__name__}._start_jobs raised {type(e).__name__}: {e}",
                         traceback.format_exc()) from None
    statuses = task.job_statuses()
    read = max((int(st.get("docs_read") or 0) for st in statuses.values()), default=0)
    return _outputs(scope, context.outputs, statuses), read


def _materialize(scope: Scope, name: str, docs: bytes) -> None:
    """Write an inline output into its staging collection (from scratch)."""
    scope.db.drop_collection(name)
    scope.db.create_collection(name)
    raw = bson.decode_all(docs, CodecOptions(document_class=RawBSONDocument))
    for i in range(0, len(raw), 1000):
        scope.db[name].insert_many(raw[i:i + 1000], ordered=False)


def _inline_of(job_id: Any, statuses: dict) -> Optional[list]:
    """The inline output of job ``job_id`` (``[{name, coll, docs}]``), or None."""
    st = statuses.get(job_id) or {}
    if st.get("write_path") != "inline":
        return None
    if "inline" not in st:
        raise StepFailed(f"the router no longer holds the output of job {job_id} "
                         f"(fetched too late)")
    return st["inline"]


def _outputs(scope: Scope, started: list[dict], statuses: dict) -> list[dict]:
    """One output per (target, staging) pair; every staging collection exists, or
    the output is inline."""
    existing: Optional[set] = None
    outputs: list[dict] = []
    kept = 0
    for out in started:
        inline = _inline_of(out.get("job_id"), statuses)
        out = {k: v for k, v in out.items() if k != "job_id"}
        if inline is not None:
            for part in inline:
                this = out if out["kind"] == "mr" else {
                    **out, "target": out["target"] + part["coll"], "staging": part["name"],
                    "c": part["coll"]}
                kept += len(part["docs"])
                if kept <= RECORD_BUDGET:
                    outputs.append({**this, "inline": Binary(part["docs"]), "applied": False})
                else:  # many jobs: the record would grow too large
                    _materialize(scope, this["staging"], part["docs"])
                    outputs.append({**this, "applied": False})
            continue
        if existing is None:
            existing = set(scope.db.list_collection_names())
        if out["kind"] == "mr":
            if out["staging"] not in existing:  # a job with no result: still applies
                scope.db.create_collection(out["staging"])
            outputs.append({**out, "applied": False})
        else:  # one output per collection the xmr job wrote
            for c in sorted(x for x in existing if x.startswith(out["staging"])):
                key = c[len(out["staging"]):]
                outputs.append({**out, "target": out["target"] + key, "staging": c,
                                "c": key, "applied": False})
    targets = [o["target"] for o in outputs]
    dup = sorted({t for t in targets if targets.count(t) > 1})
    if dup:
        raise StepFailed(f"several jobs write to {', '.join(dup)}; give each job its own "
                         f"output collection")
    return outputs
