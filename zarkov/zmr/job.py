"""One job and its phases: query → map → reduce (+finalize) → commit.

A :class:`Job` runs in its own greenlet inside the router.  It reads the input
(:mod:`.reader`), keeps chunks in flight through a :class:`~.dispatch.TaskSet`,
appends the map output to partition files (:mod:`.spill`), has each partition
reduced on a worker, then writes the outputs (:mod:`.commit`).  An input that fits
in one chunk is mapped, reduced and finalized by one task, and a ``replace`` output
no larger than the request's ``inline_max`` is handed back in the status instead of
written.  ``status()`` is the document that the ``status`` request returns.

Any failure — shipped code raising, source that does not compile, the database
refusing a write — ends the job in state ``error`` with a traceback.  Outputs
are written only after every task succeeded, so a failed job leaves them as
they were (except a database failure in the middle of a ``merge``/``reduce``
write: there is no transaction to roll back).
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from typing import Any, Callable

import bson
import gevent
import gevent.event
import gevent.queue

from zarkov.errors import JobHalted
from zarkov.zmr import commit, reader
from zarkov.zmr.commit import COMMIT_BATCH
from zarkov.zmr.dispatch import TaskFailed, TaskSet
from zarkov.zmr.jobspec import JobSpec
from zarkov.zmr.jobstate import JobState
from zarkov.zmr.spill import Spill

log = logging.getLogger("zarkov.zmr.job")

READ_AHEAD = 2      # chunks read and waiting for a free slot

_END = object()


class Job(JobState):
    """One mapreduce, xmapreduce or basic job owned by a router."""

    def __init__(self, router, spec: JobSpec):
        super().__init__(spec)
        self.router = router
        self.zcfg = router.config.zmr
        if spec.kind != "basic":
            self.info.update(chunks_resent=0, resent_lost=0, resent_for_time_limit=0,
                             duplicates_ignored=0)
        self.done = gevent.event.Event()
        self.greenlet: gevent.Greenlet | None = None
        self._task_seq = 0
        self._sets: list[TaskSet] = []
        self._spill: Spill | None = None
        self._outputs: dict[str, int] = {}     # target collection -> out file index
        self._colls: dict[str, str] = {}       # target collection -> name the map gave

    # -- public ------------------------------------------------------------------

    def start(self) -> "Job":
        """Run the job in a new greenlet."""
        self.greenlet = gevent.spawn(self.run)
        return self

    def status(self) -> dict[str, Any]:
        """The job's state and progress, with what its task sets sent again."""
        out = super().status()
        for ts in self._sets:
            for key, n in (("chunks_resent", ts.resent), ("resent_lost", ts.resent_lost),
                           ("resent_for_time_limit", ts.resent_for_time_limit),
                           ("duplicates_ignored", ts.duplicates)):
                out[key] = out.get(key, 0) + n
        return out

    def run(self) -> None:
        """All phases; the outcome is recorded in ``info``, never raised."""
        self.started = time.time()
        log.info("job %s (%s) started", self.job_id, self.spec.kind)
        try:
            self._check_sources()
            if self.spec.kind == "basic":
                self._basic()
            else:
                self._spill = Spill(self.zcfg.job_root, self.job_id)
                self._map()  # and reduce
                self._commit()
            self._phase("complete")
        except (JobHalted, TaskFailed) as e:
            self._failed(e.traceback or str(e))
        except gevent.GreenletExit:
            self._failed("the router stopped before the job ended")
        except Exception:  # noqa: BLE001 - the router's own failures end the job too
            self._failed(traceback.format_exc())
        finally:
            self._cleanup()
            self.ended = time.time()
            log.info("job %s ended: %s in %.2f s", self.job_id, self.info["state"],
                     self.ended - self.started)
            self.done.set()

    # -- phases ------------------------------------------------------------------

    @property
    def spill(self) -> Spill:
        """The job's files of intermediate results (made when a map-reduce job starts)."""
        assert self._spill is not None, "the job has no spill files"
        return self._spill

    def _next_id(self) -> int:
        self._task_seq += 1
        return self._task_seq

    def _taskset(self, name: str, on_result: Callable[[int, dict, list[bytes]], None]) -> TaskSet:
        ts = TaskSet(self.router.dispatcher, self.job_id, name, on_result,
                     lambda: self.router.dispatcher.limit(self.zcfg.outstanding_chunks),
                     self.zcfg.max_chunk_timeout, self._sets[-1] if self._sets else None)
        self._sets.append(ts)
        return ts

    def _header(self, kind: str, **extra: Any) -> dict[str, Any]:
        return {"j": self.job_id, "kind": kind, "fns": self.spec.fns,
                "xmr": self.spec.kind == "xmapreduce", **extra}

    def _run_tasks(self, ts: TaskSet, tasks) -> None:
        """Add every (header, payload frames, size) of ``tasks`` to ``ts`` and wait."""
        try:
            for header, payload, size in tasks:
                tid = self._next_id()
                ts.add(tid, [bson.encode({**header, "t": tid}), *payload], size)
            ts.close()
            ts.wait()
        finally:
            self.router.dispatcher.unregister(ts)

    def _basic(self) -> None:
        self._phase("running")
        ts = self._taskset("basic",
                           lambda tid, h, f: self.info.__setitem__("result", h.get("result")))
        header = self._header("basic", args=self.spec.args, kwargs=self.spec.kwargs)
        self._run_tasks(ts, [(header, [], 0)])

    def _map(self) -> None:
        self._phase("map")
        queue: gevent.queue.Queue = gevent.queue.Queue(maxsize=READ_AHEAD)
        feeder = gevent.spawn(self._read_input, queue)
        header = self._header("map", rc=self.zcfg.reduce_count)

        def item():
            got = queue.get()
            if isinstance(got, BaseException):
                raise got
            return got

        def chunks(read):
            got = read.pop(0) if read else item()
            while got is not _END:
                chunk, count = got
                self.info["docs_read"] += count
                self.info["chunks_total"] += 1
                yield header, [chunk], len(chunk)
                got = read.pop(0) if read else item()

        try:
            read = [item()]
            if read[0] is not _END:
                read.append(item())
                if read[1] is _END:
                    self._map_reduce(read[0])  # one chunk: one task does it all
                    return
            self._run_tasks(self._taskset("map", self._on_map_result), chunks(read))
        finally:
            feeder.kill()
        self._reduce()

    def _map_reduce(self, first: tuple[bytes, int]) -> None:
        """The whole input in one chunk: map, reduce (and finalize) it in one task.

        The map's combining already reduces every key of the chunk, so partitions
        and their reduce tasks would only cost round trips: a small job (a real-time
        run's) is one task.
        """
        chunk, count = first
        self.info["docs_read"] += count
        self.info["chunks_total"] += 1
        if self.spec.kind == "mapreduce":
            self._out_index(self.spec.output_name, "")
        header = self._header("mapreduce", finalize=self.spec.output_type != "reduce")

        def on_result(tid: int, header: dict, frames: list[bytes]) -> None:
            self._store_outputs(header, frames)
            self.info["chunks_done"] += 1

        self._run_tasks(self._taskset("map", on_result), [(header, [chunk], len(chunk))])

    def _read_input(self, queue: gevent.queue.Queue) -> None:
        try:
            db = self.router.mongo[self.spec.database]
            batches = reader.raw_arrays(db, self.spec.input_names, self.spec.query)
            for item in reader.cut_chunks(batches, self.zcfg.map_chunk_size):
                queue.put(item)
            queue.put(_END)
        except Exception:  # noqa: BLE001 - handed to the job's greenlet
            queue.put(JobHalted(traceback.format_exc()))

    def _on_map_result(self, tid: int, header: dict, frames: list[bytes]) -> None:
        for p, data in zip(header["parts"], frames):
            self.spill.append(f"part-{p:04d}", data)
        self.info["chunks_done"] += 1

    def _reduce(self) -> None:
        self._phase("reduce")
        names = self.spill.names("part-")
        self.info["partitions_total"] = len(names)
        if self.spec.kind == "mapreduce":
            self._out_index(self.spec.output_name, "")  # replace leaves it empty if no output
        # In reduce mode, finalize runs after folding in the stored values (commit).
        header = self._header("reduce", finalize=self.spec.output_type != "reduce")
        self._run_tasks(self._taskset("reduce", self._on_reduce_result),
                        (({**header, "echo": {"parts": k}}, [data], len(data))
                         for data, k in self._reduce_inputs(names)))

    def _reduce_inputs(self, names: list[str]):
        """(data, partitions in it) of each reduce task: several small partitions to a
        task.

        A partition's keys belong to it alone, so partitions concatenated reduce as
        they would one by one; tasks of about the total over twice the live worker
        processes (at most ``map_chunk_size`` each) keep every process busy without a
        round trip per partition of a few keys.
        """
        sizes = [os.path.getsize(self.spill.path(n)) for n in names]
        workers = max(1, len(self.router.dispatcher.live_workers()))
        share = max(sum(sizes) // (2 * workers), 1)
        budget = min(self.zcfg.map_chunk_size, share)
        batch: list[bytes] = []
        size = 0
        for name, n in zip(names, sizes):
            if batch and size + n > budget:
                yield b"".join(batch), len(batch)
                batch, size = [], 0
            batch.append(self.spill.read(name))
            size += n
        if batch:
            yield b"".join(batch), len(batch)

    def _out_index(self, target: str, coll: str) -> int:
        if target not in self._outputs:
            self._outputs[target] = len(self._outputs)
            self._colls[target] = coll
        return self._outputs[target]

    def _on_reduce_result(self, tid: int, header: dict, frames: list[bytes]) -> None:
        self._store_outputs(header, frames)
        echo = header.get("echo")
        self.info["partitions_done"] += echo.get("parts", 1) if isinstance(echo, dict) else 1

    def _store_outputs(self, header: dict, frames: list[bytes]) -> None:
        """Reduced documents of a task, appended to their output's file."""
        for coll, data in zip(header["colls"], frames):
            idx = self._out_index(self._target(coll), coll)
            self.spill.append(f"out-{idx:03d}", data)

    # -- commit ------------------------------------------------------------------

    def _written(self, n: int) -> None:
        self.info["docs_written"] += n

    def _batches(self, name: str):
        if not self.spill.exists(name):
            return iter(())
        return self.spill.iter_batches(name, COMMIT_BATCH)

    def _commit(self) -> None:
        self._phase("commit")
        if self._inline():
            return
        db = self.router.mongo[self.spec.database]
        prefix = "out-"
        if self.spec.output_type == "reduce":
            self._rereduce(db)
            prefix = "final-"
        outputs = {t: self._batches(f"{prefix}{i:03d}") for t, i in self._outputs.items()}
        path = commit.write(self.router.writes(self.spec.database), self.spec.output_type,
                            outputs, lambda t: commit.temp_name(self.job_id, self._outputs[t]),
                            self._written)
        if path is not None:
            self.info["write_path"] = path

    def _inline(self) -> bool:
        """Hand a small output back in the status instead of writing it (``inline_max``).

        ``inline``: ``[{name, coll, docs}]``, one per output collection — the
        collection the job would have written, the name the map gave it (xmapreduce)
        and its documents as concatenated BSON.  Nothing is written to the database.
        """
        if not self.spec.inline_max:
            return False
        files = {t: f"out-{i:03d}" for t, i in self._outputs.items()}
        size = sum(os.path.getsize(self.spill.path(f)) for f in files.values()
                   if self.spill.exists(f))
        if size > self.spec.inline_max:
            return False
        self._hand_back([
            {"name": t, "coll": self._colls[t],
             "docs": self.spill.read(f) if self.spill.exists(f) else b""}
            for t, f in files.items()])
        return True

    def _rereduce(self, db) -> None:
        """Reduce mode: fold the stored values in, on workers, before any write."""
        def tasks():
            for target, idx in self._outputs.items():
                extra = {"c": self._colls[target]} if self.spec.kind == "xmapreduce" else {}
                header = self._header("rereduce", finalize=True, echo={"out": idx}, **extra)
                for batch in self._batches(f"out-{idx:03d}"):
                    new = b"".join(batch)
                    yield header, [new, commit.existing(db[target], batch)], len(new)

        def on_result(tid: int, header: dict, frames: list[bytes]) -> None:
            self.spill.append(f"final-{header['echo']['out']:03d}", frames[0])

        self._run_tasks(self._taskset("rereduce", on_result), tasks())

    def _cleanup(self) -> None:
        for ts in self._sets:
            self.router.dispatcher.unregister(ts)
        if self._spill is not None:
            self._spill.remove()
