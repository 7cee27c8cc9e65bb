"""Journal → MongoDB: commit journaled events to the ``event`` collection in batches.

A file is committed as soon as it is full (closed by the writer); the records of
the open file are committed once the oldest of them has waited ``LINGER`` (20 ms),
so that what arrives meanwhile joins the same insert: an event is stored a few tens
of milliseconds after it was journaled when the logger keeps up, and inserts grow on
their own when it falls behind (they wait for the previous one to end).  After each
insert the committer publishes how far each stream of the batch is now stored
(:mod:`zarkov.streams`: the bound that runs read positions up to; a batch is
inserted whole before its bound moves, and batches go in journal order), then
:func:`zarkov.eventlog.notify.committed` tells the real-time loop, which aggregates
them at once.  Events
carry their ``_id`` from the journal, and an unordered insert reports a
duplicate key for one already stored, so committing a record twice (a replay after
a crash, a retry after a lost reply) stores it once.  A file is deleted once all its
records are committed.  When the database is unreachable, files wait and the commit
is retried with a growing pause; intake goes on meanwhile.  At start-up every file
left in the journal directories this process owns is replayed.

A document the database refuses must not hold the journal back.  A refusal the server
states per document (a key with a dot, a nested array …) moves that document to the
rejects at once.  When a whole insert fails otherwise — a command error, or the
connection closed, as FerretDB does on a NaN — the committer asks the server for
``ping``: no answer is an outage (everything stays journaled and is retried); an
answer means the batch holds something the server refuses, so the batch is split in
halves, again and again, to find it.  A document is set aside (source ``database``)
only once it has failed in its batch and then :data:`LONE_TRIES` times alone, with
``ping`` answering after each failure, so that a passing hiccup never rejects a good
event.  Each failure costs about half a second (the driver finds the server again),
so a refused document costs one or two seconds, not the journal.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import os
import time
from typing import Any

import gevent
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, PyMongoError

from zarkov import faults, streams
from zarkov.errors import ZarkovError
from zarkov.eventlog import notify
from zarkov.eventlog.journal import HEADER, MAGIC, Journal, read_records
from zarkov.eventlog.rejects import RejectLog
from zarkov.eventlog.stats import Stats
from zarkov.oneline import first_line as clip
from zarkov.runtime import loops
from zarkov.storage.writes import insert_raw

#: Seconds the oldest record of the open file waits for others to join its insert.
LINGER = 0.02
CHUNK_BYTES = 4 << 20
CHUNK_DOCS = 10000
PARALLEL = 2          # parts of an insert in flight at once (see insert_unordered)
PARALLEL_MIN = 2000   # the least documents split into parts
RETRY_MIN, RETRY_MAX = 0.5, 5.0
DUPLICATE_CODES = frozenset((11000, 11001, 12582))
LONE_TRIES = 2      # tries alone, each failing with ping answering, before a refusal
LONE_PAUSE = 0.25   # seconds between two tries of a lone document

log = logging.getLogger("zarkov.eventlog")


class DatabaseDown(ZarkovError):
    """The database could not be reached; the batch is to be retried later."""


class Committer:
    """The commit greenlet of one event-server process."""

    def __init__(self, collection: Collection, journal: Journal, replay: list[str],
                 stats: Stats, rejects: RejectLog):
        self.collection = collection
        self.journal = journal
        self.stats = stats
        self.rejects = rejects
        self.backlog: collections.deque[str] = collections.deque(replay)
        self.done: dict[str, int] = {}   # path -> offset up to which records are stored
        self._greenlet = None
        self._stopping = False
        self._deadline = float("inf")
        self._pending_since: float | None = None
        self._retry = RETRY_MIN
        # Digests of the documents of the batch being committed that the database
        # refused: a retry after an outage in the middle of a split skips them.
        self._refused: set[bytes] = set()
        if replay:
            log.info("replaying %d journal file(s) left by an earlier run", len(replay))

    def start(self) -> None:
        """Start the commit greenlet."""
        self._greenlet = loops.spawn("commit loop", self._run)

    def stop(self, timeout: float) -> bool:
        """Commit what is journaled (the journal must be closed first), within ``timeout``.

        Returns True when everything was committed; files left are replayed at the
        next start.
        """
        self._stopping = True
        self._deadline = time.monotonic() + timeout
        self.journal.changed.set()
        if self._greenlet is None:
            return not self.backlog
        self._greenlet.join(timeout)
        if not self._greenlet.dead:
            self._greenlet.kill(block=True, timeout=2)
        return not self.backlog and not self.journal.closed

    # -- the loop -------------------------------------------------------------------

    def _run(self) -> None:
        j = self.journal
        while True:
            self.backlog.extend(j.closed)
            j.closed.clear()
            self.stats.backlog_files = len(self.backlog)
            try:
                if self.backlog:
                    self._commit_backlog()
                    continue
                if self._stopping:
                    return
                if j.fd is not None and j.path is not None \
                        and j.size > self.done.get(j.path, len(MAGIC)):
                    now = time.monotonic()
                    if self._pending_since is None:
                        self._pending_since = now
                    wait = LINGER - (now - self._pending_since)
                    if wait <= 0:
                        self._commit_open_file()
                        self._pending_since = None
                        continue
                    j.changed.clear()
                    gevent.sleep(wait)
                    continue
                self._pending_since = None
                j.changed.clear()
                j.changed.wait()
            except DatabaseDown:
                if self._stopping and time.monotonic() + self._retry > self._deadline:
                    return
                gevent.sleep(self._retry)
                self._retry = min(RETRY_MAX, self._retry * 2)
            except Exception:  # noqa: BLE001 - e.g. a journal file that cannot be read
                self.stats.errors.record("commit loop")
                if self._stopping and time.monotonic() + self._retry > self._deadline:
                    return
                gevent.sleep(self._retry)
                self._retry = min(RETRY_MAX, self._retry * 2)

    def _commit_open_file(self) -> None:
        j = self.journal
        path, end = j.path, j.size
        assert path is not None, "no open journal file"
        start = self.done.get(path, len(MAGIC))
        docs = j.recorded(path, start, end)
        if docs is None:
            docs, _, _ = read_records(path, start, end)
        self._insert_records(path, start, docs)

    def _commit_backlog(self) -> None:
        """Commit the oldest closed files: several small ones in one insert (why: fewer
        round trips when the logger is behind), a big one in chunks."""
        group: list[tuple[str, int, list[bytes], Any]] = []
        ndocs = nbytes = 0
        for path in list(self.backlog):
            start = self.done.get(path, 0)
            problem = None
            docs = self.journal.recorded(path, start)
            if docs is None:
                try:
                    docs, _, problem = read_records(path, start)
                except FileNotFoundError:
                    docs = []
            size = sum(map(len, docs))
            if group and (ndocs + len(docs) > CHUNK_DOCS or nbytes + size > CHUNK_BYTES):
                break
            group.append((path, max(start, len(MAGIC)), docs, problem))
            ndocs += len(docs)
            nbytes += size
        if len(group) == 1:
            path, start, docs, problem = group[0]
            self._insert_records(path, start, docs)
        elif ndocs:
            self._insert([d for _, _, docs, _ in group for d in docs])
        for path, _, docs, problem in group:
            self._finish_file(path, len(docs), problem)
            self.backlog.popleft()

    def _observe(self, path: str, offset: int | None = None) -> None:
        """Record the commit latency of the appends now stored: those of ``path`` up
        to ``offset`` (None: the whole file)."""
        appends, now = self.journal.appends, time.monotonic()
        while appends and appends[0][0] == path and (offset is None or appends[0][1] <= offset):
            self.stats.commit_seconds.observe(now - appends.popleft()[2])

    def _finish_file(self, path: str, count: int, problem: str | None) -> None:
        self.done.pop(path, None)
        self.journal.forget(path)
        self._observe(path)
        if not os.path.exists(path):
            return
        if problem:
            # Why keep it: the tail cannot be read; an operator may want to look at it.
            log.error("journal file %s: %s; committed %d event(s) before it, "
                      "kept as %s.corrupt", path, problem, count, path)
            os.replace(path, path + ".corrupt")
        else:
            os.unlink(path)

    def _insert_records(self, path: str, offset: int, docs: list[bytes]) -> None:
        """Insert ``docs`` (read from ``path`` at ``offset``) in chunks, noting progress."""
        i = 0
        while i < len(docs):
            chunk: list[bytes] = []
            nbytes = 0
            while i < len(docs) and len(chunk) < CHUNK_DOCS and nbytes < CHUNK_BYTES:
                chunk.append(docs[i])
                nbytes += len(docs[i])
                i += 1
            self._insert(chunk)
            offset += nbytes + HEADER.size * len(chunk)
            self.done[path] = offset
            self.journal.forget(path, offset)
            self._observe(path, offset)

    def _insert(self, docs: list[bytes]) -> None:
        """Store ``docs``, setting aside those the database refuses; raises DatabaseDown
        when the database cannot be reached (the caller retries the same ``docs``)."""
        if self._refused:
            docs = [d for d in docs if _digest(d) not in self._refused]
        started = time.monotonic()
        before = self.stats.committed - self.stats.duplicates
        if faults.armed("commit.insert"):
            faults.hit("commit.insert", b"".join(docs))
        error = self._try_insert(docs) if docs else None
        if error is not None:
            self._check_up(error)
            log.warning("an insert of %d events failed while the database answers ping "
                        "(%s); splitting it to find what the database refuses",
                        len(docs), clip(error))
            self._split(docs)
        if faults.armed("commit.publish"):
            faults.hit("commit.publish", b"".join(docs))
        self._publish(docs)
        self._refused.clear()
        new = self.stats.committed - self.stats.duplicates - before
        if new > 0:
            notify.committed(self.collection.name, new)
        log.debug("committed %d events in %.3f s", len(docs), time.monotonic() - started)

    def _publish(self, docs: list[bytes]) -> None:
        """Tell the registry how far the streams of ``docs`` are stored (all of ``docs``
        is: stored, already there, or set aside as refused)."""
        bounds = streams.bounds_of(docs)
        if not bounds:
            return
        try:
            streams.publish(self.collection.database, self.collection.name, bounds,
                            self.journal.directory)
        except PyMongoError as e:
            self._down(e)  # the caller inserts the same docs again (duplicates), then this

    def _try_insert(self, docs: list[bytes]) -> Exception | None:
        """One insert: None when done (refusals of single documents included), else the
        error that failed it as a whole; raises DatabaseDown on a write concern error."""
        try:
            insert_unordered(self.collection, docs)
        except BulkWriteError as e:
            errors = e.details.get("writeErrors", [])
            dups = sum(1 for x in errors if x.get("code") in DUPLICATE_CODES)
            refused = [x for x in errors if x.get("code") not in DUPLICATE_CODES]
            for x in refused:
                self._refuse(docs[x["index"]],
                             f"refused by the database: {clip(str(x.get('errmsg')), 200)}")
            if e.details.get("writeConcernErrors"):
                self._down(e)  # why retry: the write may not be durable; replays are harmless
            self._stored(len(docs) - len(refused), dups)
            return None
        except Exception as e:  # noqa: BLE001 - connection closed, command refused, a
            return e            # document pymongo will not send ...: ping, then split
        self._stored(len(docs), 0)
        return None

    def _check_up(self, error: Exception) -> None:
        """Raise DatabaseDown unless the database answers ``ping``."""
        try:
            self.collection.database.client.admin.command("ping")
        except PyMongoError:
            self._down(error)

    def _split(self, docs: list[bytes]) -> None:
        """``docs`` failed as a whole: insert its halves, and the halves of a half
        that fails, down to lone documents."""
        stack = [docs]
        while stack:
            part = stack.pop()
            if len(part) == 1:
                self._insert_lone(part[0])
                continue
            if part is not docs:
                error = self._try_insert(part)
                if error is None:
                    continue
                self._check_up(error)
            mid = len(part) // 2
            stack.append(part[mid:])
            stack.append(part[:mid])  # taken first: the journal's order

    def _insert_lone(self, doc: bytes) -> None:
        error: Exception | None = None
        for attempt in range(1, LONE_TRIES + 1):
            error = self._try_insert([doc])
            if error is None:
                return
            self._check_up(error)
            if attempt < LONE_TRIES:
                gevent.sleep(LONE_PAUSE)
        assert error is not None  # every attempt failed
        self._refuse(doc, f"refused by the database: {clip(error)} (failed in its batch and "
                          f"{LONE_TRIES} times alone while the database answered ping)")

    def _refuse(self, doc: bytes, reason: str) -> None:
        self._refused.add(_digest(doc))
        self.rejects.add("database", doc, reason)

    def _stored(self, n: int, dups: int) -> None:
        self.stats.committed += n
        self.stats.duplicates += dups
        self.stats.commits.append((time.time(), self.stats.committed))
        if not self.stats.db_ok:
            log.info("the database is back; committing the journal")
        self.stats.db_ok = True
        self._retry = RETRY_MIN

    def _down(self, e: Exception) -> None:
        if self.stats.db_ok:
            log.error("cannot commit to the database (%s); events stay in the journal "
                      "and are retried", e)
        self.stats.db_ok = False
        self.stats.db_errors += 1
        self.stats.last_db_error = str(e)[:200]
        raise DatabaseDown(str(e)) from e


def insert_unordered(collection: Collection, docs: list[bytes]) -> None:
    """``insert_many(ordered=False)`` of ``docs`` (:func:`zarkov.storage.writes.insert_raw`),
    in :data:`PARALLEL` parts on as many connections at once when there are at least
    :data:`PARALLEL_MIN` documents.

    Why: one insert at a time leaves the server idle while the reply travels and the
    next batch is encoded, and the logger's other work delays both.  An unordered
    insert promises no order, so parts in flight together are the same insert; their
    per-document errors come back as one BulkWriteError (indexes into ``docs``), any
    other error of a part fails the whole (the caller's retry stores each document
    once: they carry their ``_id``).
    """
    if len(docs) < PARALLEL_MIN:
        insert_raw(collection, docs)
        return
    step = -(-len(docs) // PARALLEL)
    starts = list(range(0, len(docs), step))
    jobs = [gevent.spawn(insert_raw, collection, docs[at:at + step]) for at in starts]
    gevent.joinall(jobs)
    failed = next((j.exception for j in jobs if j.exception is not None
                   and not isinstance(j.exception, BulkWriteError)), None)
    if failed is not None:
        raise failed
    errors: list[dict] = []
    concern: list[dict] = []
    for at, job in zip(starts, jobs):
        if isinstance(job.exception, BulkWriteError):
            details = job.exception.details
            errors += [{**x, "index": x["index"] + at} for x in details.get("writeErrors", [])]
            concern += details.get("writeConcernErrors", [])
    if errors or concern:
        raise BulkWriteError({"writeErrors": errors, "writeConcernErrors": concern,
                              "nInserted": len(docs) - len(errors)})


def _digest(doc: bytes) -> bytes:
    return hashlib.blake2b(doc, digest_size=16).digest()
