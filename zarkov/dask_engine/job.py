"""One map-reduce or basic job run on Dask, driven from the gateway.

The phases and the status document are the router's (:mod:`zarkov.zmr.job`):
``map`` → ``reduce`` → ``commit`` → ``complete`` (or ``error`` with a traceback),
``docs_read``, ``chunks_done``/``chunks_total``, ``partitions_done``/
``partitions_total``, ``docs_written``, ``elapsed``, ``phase_seconds``,
``write_path``, ``inline``, a basic job's ``result``.  The work is a Dask graph:

* one task per piece of the input (:mod:`.split`) reads it from the database and
  maps + combines it into ``parts`` partitions (a ``scan`` piece is first read and
  cut into chunks by one task, then one map task per chunk; the slices of a
  collection must agree on their edges, else the job is read again as one scan);
* the shuffle is Dask's: one small task per (map result, partition) picks that
  partition's records, and the reduce task of partition ``p`` depends on every
  map's pick of ``p``, so Dask moves each partition's records worker to worker;
* reduce (and finalize) per partition; in ``reduce`` mode, a re-reduce task per
  output batch folds in the stored values;
* an input that is one piece (or one chunk) is mapped, reduced and finalized by
  one task, as the router does it.

Only this process writes outputs, after every task has succeeded, with the same
code as the router (:mod:`zarkov.zmr.commit`): Dask may run a task again (a lost
worker), never a write; a job that fails, or whose scheduler goes away, leaves its
outputs as they were.
"""
from __future__ import annotations

import logging
import struct
import threading
import time
import traceback
from typing import Any, Callable, Optional

from distributed import Client, Future, as_completed

from zarkov import storage
from zarkov.dask_engine import split, tasks
from zarkov.errors import JobHalted
from zarkov.zmr import commit
from zarkov.zmr.commit import COMMIT_BATCH
from zarkov.zmr.jobspec import JobSpec
from zarkov.zmr.jobstate import JobState

log = logging.getLogger(__name__)


class DaskJob(JobState):
    """One job of the gateway; :meth:`run` in a thread of its own."""

    def __init__(self, spec: JobSpec, client_of: Callable[[], Client], mongo_uri: str,
                 mongo: Any, chunk_size: int, reduce_count: int, scheduler: str):
        super().__init__(spec, engine="dask")
        self._client_of = client_of
        self.mongo_uri = mongo_uri
        self.mongo = mongo
        self.chunk_size = chunk_size
        self.reduce_count = reduce_count
        self.scheduler = scheduler
        self.done = threading.Event()
        self._futures: list[Future] = []

    # -- public ------------------------------------------------------------------
    def start(self) -> "DaskJob":
        """Run the job in a daemon thread."""
        threading.Thread(target=self.run, name=f"job-{self.job_id[:8]}", daemon=True).start()
        return self

    def run(self) -> None:
        """All phases; the outcome is recorded in ``info``, never raised."""
        self.started = time.time()
        try:
            self._check_sources()
            client = self._client()
            if self.spec.kind == "basic":
                self._phase("running")
                fut = self._submit(client, tasks.basic, self.spec.fns,
                                   self.spec.args, self.spec.kwargs, key="basic")
                self.info["result"] = self._result(fut)
            else:
                outputs = self._map_reduce(client)
                self._commit(client, outputs)
            self._phase("complete")
        except JobHalted as e:
            self._failed(e.traceback or str(e))
        except OSError as e:
            # Raised by the client itself (a task's own error comes as JobHalted):
            # the scheduler went away mid-job and did not come back in time.
            self._failed(f"zarkov.dask_engine: lost the Dask scheduler at {self.scheduler}: "
                         f"{type(e).__name__}: {e}\n")
        except Exception:  # noqa: BLE001 - the gateway's own failures end the job too
            self._failed(traceback.format_exc())
        finally:
            self._release()
            self.ended = time.time()
            log.info("job %s ended: %s in %.2f s", self.job_id, self.info["state"],
                     self.ended - self.started)
            self.done.set()

    # -- helpers -----------------------------------------------------------------
    def _client(self) -> Client:
        try:
            return self._client_of()
        except Exception as e:  # noqa: BLE001 - unreachable scheduler, bad TLS files
            raise JobHalted(f"zarkov.dask_engine: no Dask scheduler at {self.scheduler}: "
                            f"{type(e).__name__}: {e}\n") from None

    def _submit(self, client: Client, func: Callable[..., Any], *args: Any, key: str,
                workers: Optional[str] = None) -> Future:
        where = {"workers": [workers], "allow_other_workers": True} if workers else {}
        fut = client.submit(func, *args, key=f"{key}-{self.job_id}-{len(self._futures)}",
                            pure=False, **where)
        self._futures.append(fut)
        return fut

    def _failure(self, fut: Future) -> JobHalted:
        """What a failed or cancelled future means, as a job error."""
        if fut.status == "error":
            exc, tb = fut.exception(), fut.traceback()
            text = "".join(traceback.format_exception(type(exc), exc, tb))
            return JobHalted(text)
        # One line: what zcmd aggregate shows (the last line of a job's traceback).
        return JobHalted(f"zarkov.dask_engine: the Dask scheduler at {self.scheduler} was "
                         f"lost or cancelled the job (task {fut.key} {fut.status})\n")

    def _result(self, fut: Future) -> Any:
        try:
            return fut.result()
        except Exception:  # noqa: BLE001 - the task's own exception, or a cancellation
            raise self._failure(fut) from None

    def _gather(self, client: Client, futures: list[Future]) -> list[Any]:
        """The results of ``futures`` in one exchange with the scheduler."""
        try:
            return client.gather(futures)
        except Exception:  # a task's own exception, or a cancellation: which one
            failed = next((f for f in futures if f.status != "finished"), None)
            if failed is None:
                raise
            raise self._failure(failed) from None

    def _each(self, futures: list[Future], on_done: Callable[[Future], None]) -> None:
        """Wait for every future; ``on_done`` for each as it completes; fail fast."""
        # The gateway's client is not Dask's default one: name its loop.
        for fut in as_completed(futures, loop=futures[0].client.loop if futures else None):
            if fut.status != "finished":
                raise self._failure(fut)
            on_done(fut)

    def _release(self) -> None:
        # Futures no longer referenced are released by the client: the scheduler
        # forgets their results (and cancels what had not run, after a failure).
        futures, self._futures = self._futures, []
        client = None
        try:
            client = self._client_of() if futures else None
        except Exception:  # noqa: BLE001 - no client: nothing to cancel
            pass
        if client is not None and self.info.get("state") == "error":
            try:
                client.cancel(futures)
            except Exception:  # noqa: BLE001 - the scheduler is gone already
                pass

    # -- map and reduce ------------------------------------------------------------
    def _map_reduce(self, client: Client) -> dict[str, bytes]:
        """Map, shuffle and reduce; return {collection the map named: documents}.

        The whole graph is submitted at once (the reduces start as soon as their maps
        end); then the maps are watched for progress, then the reduces.
        """
        spec = self.spec
        self._phase("map")
        db = self.mongo[spec.database]
        nthreads = client.nthreads()
        threads = max(1, sum(nthreads.values()))
        caps = storage.capabilities(self.mongo, spec.database)
        pieces = split.pieces(db, caps, spec.input_names, spec.query, threads)
        outputs = self._graph(client, pieces, sorted(nthreads), threads)
        if outputs is None:
            log.warning("job %s: documents moved in the input while its slices were read; "
                        "reading it again as one scan", self.job_id)
            with self._lock:
                for key in ("docs_read", "chunks_done", "partitions_done"):
                    self.info[key] = 0
            scans = [("scan", [name], spec.query) for name in spec.input_names]
            outputs = self._graph(client, scans, sorted(nthreads), threads)
            assert outputs is not None, "scans have no slices to disagree"
        return outputs

    def _graph(self, client: Client, pieces: list[tuple], workers: list[str],
               threads: int) -> Optional[dict[str, bytes]]:
        """Map, shuffle and reduce ``pieces``; None when its slices did not cover the
        input once each (:func:`split.slices_agree`)."""
        spec = self.spec
        xmr = spec.kind == "xmapreduce"
        finalize = spec.output_type != "reduce"
        fns = spec.fns
        direct = [p for p in pieces if p[0] != "scan"]
        scans = [p for p in pieces if p[0] == "scan"]
        chunks: list[Future] = []  # futures of (chunk, docs) of the scans
        sizes: list[int] = []      # and their document counts
        for piece in scans:
            sf = self._submit(client, tasks.scan_chunks, self.mongo_uri, spec.database,
                              piece, self.chunk_size, 2 * threads, key="scan")
            n = self._result(self._submit(client, tasks.counts, sf, key="count"))
            chunks += [self._submit(client, tasks.item, sf, i, key="chunk")
                       for i in range(len(n))]
            sizes += n
        total = len(direct) + len(chunks)
        with self._lock:
            self.info["chunks_total"] = total
        if total == 1:  # one task does it all, as the router does a one-chunk input
            fut = self._submit(client, tasks.map_reduce_piece, fns, self.mongo_uri,
                               spec.database, direct[0] if direct else None,
                               None if direct else chunks[0], xmr, finalize, key="mapreduce")
            n, out = self._result(fut)
            self._add("docs_read", n)
            self._add("chunks_done")
            return out
        # One partition per worker thread: enough to keep every worker reducing, and
        # each map's output cut in as few picks as that allows (a task costs the
        # scheduler about a millisecond; records of a map-side combine are few).
        parts = max(1, min(self.reduce_count, threads))
        maps = [self._submit(client, tasks.map_piece, fns, self.mongo_uri, spec.database,
                             piece, parts, xmr, key="map") for piece in direct]
        # A scan's chunks are all on the worker that read them, and Dask runs a task
        # where its data is: left alone, that one worker would map them all while the
        # others wait to steal.  Each goes to the next worker in turn instead (another
        # may take it if that one is lost).
        maps += [self._submit(client, tasks.map_chunk, fns, c, parts, xmr, key="map",
                              workers=workers[i % len(workers)] if workers else None)
                 for i, c in enumerate(chunks)]
        # The pieces' document counts and a slice's edges: a tiny task where each map
        # result is (moving the results to one place would cost more than the tasks),
        # submitted now so that each runs as its map ends.
        summaries = [self._submit(client, tasks.summary, m, key="summary")
                     for m in maps[:len(direct)]]
        reduces = []
        for p in range(parts):
            picks = [self._submit(client, tasks.partition, m, p, key="pick") for m in maps]
            reduces.append(self._submit(client, tasks.reduce_partition, fns, xmr, finalize,
                                        *picks, key="reduce"))
        known = dict(zip(maps[len(direct):], sizes))

        def mapped(fut: Future) -> None:
            self._add("docs_read", known.get(fut, 0))
            self._add("chunks_done")

        self._each(maps, mapped)
        got = self._gather(client, summaries)
        self._add("docs_read", sum(n for n, _ in got))
        if not split.slices_agree(direct, [edges for _, edges in got]):
            client.cancel(reduces)
            return None
        self._phase("reduce")
        with self._lock:
            self.info["partitions_total"] = len(reduces)
        outputs: dict[str, list[bytes]] = {}

        def reduced(fut: Future) -> None:
            for coll, data in fut.result().items():
                outputs.setdefault(coll, []).append(data)
            self._add("partitions_done")

        self._each(reduces, reduced)
        return {c: b"".join(d) for c, d in outputs.items()}

    # -- commit --------------------------------------------------------------------
    def _commit(self, client: Client, outputs: dict[str, bytes]) -> None:
        self._phase("commit")
        spec = self.spec
        by_target: dict[str, tuple[str, bytes]] = {}
        if spec.kind == "mapreduce":
            by_target[spec.output_name] = ("", outputs.get("", b""))
        else:
            for coll in sorted(outputs):
                by_target[self._target(coll)] = (coll, outputs[coll])
        if spec.inline_max and sum(len(d) for _, d in by_target.values()) <= spec.inline_max:
            self._hand_back([{"name": t, "coll": c, "docs": d}
                             for t, (c, d) in by_target.items()])
            return
        db = self.mongo[spec.database]
        if spec.output_type == "reduce":
            by_target = self._rereduce(client, db, by_target)
        index = {t: i for i, t in enumerate(by_target)}
        batches = {t: _batches(data) for t, (_, data) in by_target.items()}
        path = commit.write(storage.writes(db), spec.output_type, batches,
                            lambda t: commit.temp_name(self.job_id, index[t]),
                            lambda n: self._add("docs_written", n))
        if path is not None:
            with self._lock:
                self.info["write_path"] = path

    def _rereduce(self, client: Client, db: Any,
                  by_target: dict[str, tuple[str, bytes]]) -> dict[str, tuple[str, bytes]]:
        """Reduce mode: fold the stored values in, on Dask workers, before any write."""
        futs: dict[str, list[Future]] = {}
        for target, (coll, data) in by_target.items():
            c = coll if self.spec.kind == "xmapreduce" else None
            for batch in _batches(data):
                new = b"".join(batch)
                old = commit.existing(db[target], batch)
                futs.setdefault(target, []).append(
                    self._submit(client, tasks.rereduce, self.spec.fns, new, old, c,
                                 key="rereduce"))
        return {t: (by_target[t][0], b"".join(self._result(f) for f in fs))
                for t, fs in futs.items()}


def _batches(data: bytes, size: int = COMMIT_BATCH):
    """Concatenated BSON documents as lists of at most ``size`` raw documents."""
    docs, pos, end = [], 0, len(data)
    while pos < end:
        (n,) = struct.unpack_from("<i", data, pos)
        docs.append(data[pos:pos + n])
        pos += n
    for i in range(0, len(docs), size):
        yield docs[i:i + size]
