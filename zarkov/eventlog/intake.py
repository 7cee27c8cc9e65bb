"""The durable intake: where "an event is accepted" is defined, once for every way in.

An :class:`Intake` is what an event server (ZeroMQ sockets, :mod:`.server`) and the
web service's ``POST /events`` and beacon (:mod:`zarkov.web.intake`) each run: one
journal directory (locked by its process; its stream gives every event its
position, :mod:`.stream`), the committer that stores the journal into ``event`` and
publishes the stream's bound (:mod:`.committer`), the counters and their stats file
(:mod:`.stats`) and the rejects file (:mod:`.rejects`).

**An event is accepted once :meth:`Intake.append` has written it to the journal.**
From then on a crash loses nothing: the committer stores it, now or, replaying the
journal, after a restart.  Callers hand out positions and append under
:meth:`Intake.appending`, so the journal holds each stream's positions in order.
Whatever is not accepted goes to the rejects with a one-line reason.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Iterator, Optional

import gevent
import pymongo
from pymongo.write_concern import WriteConcern

from zarkov.eventlog import journal as J
from zarkov.eventlog.committer import Committer
from zarkov.eventlog.rejects import RejectLog, rejects_path
from zarkov.eventlog.stats import Stats, write_loop, write_stats
from zarkov.eventlog.stream import Stream
from zarkov.runtime import loops

#: Seconds between two rewrites of a stats file (when something changed).
STATS_INTERVAL = 0.1
#: Seconds between two tries of a journal write that failed (a full disk).
RETRY_WRITE = 1.0

log = logging.getLogger("zarkov.eventlog")


def mongo_collection(config: Any) -> tuple[pymongo.MongoClient, Any]:
    """The ``event`` collection, with acknowledged writes whatever the URI says."""
    client: pymongo.MongoClient = pymongo.MongoClient(
        config.mongo_uri, serverSelectionTimeoutMS=2000, connectTimeoutMS=2000,
        socketTimeoutMS=120000)
    coll = client[config.mongo_database]["event"]
    if not coll.write_concern.acknowledged:
        coll = coll.with_options(write_concern=WriteConcern(w=1))
    return client, coll


class Intake:
    """The journal, committer, counters and rejects of one journal directory.

    ``name`` names it in logs (``event server 0``, ``web intake``); ``stats_file`` is
    where its counters go; ``replay`` the directories whose journal files it commits
    at start (its own, and those of servers that no longer run).
    """

    def __init__(self, config: Any, directory: str, stats_file: str, name: str,
                 index: int = 0, replay: Optional[list[str]] = None):
        self.config = config
        self.name = name
        self.stats = Stats(index)
        self.stats_file = stats_file
        os.makedirs(config.journal, exist_ok=True)
        self.rejects = RejectLog(rejects_path(config.journal), self.stats,
                                 config.rejects_file_size, config.rejects_files)
        self.journal = J.Journal(directory, config.journal_file_size)
        self._replay = replay if replay is not None else [directory]
        self._replay_files: list[str] = []
        self.committer: Optional[Committer] = None
        self.client: Optional[pymongo.MongoClient] = None
        self._stats_loop: Optional[gevent.Greenlet] = None

    @property
    def stream(self) -> Stream:
        """The stream that gives this intake's events their positions."""
        return self.journal.stream

    def replay_also(self, directories: list[str]) -> None:
        """Commit the journal files of ``directories`` too (their writers are gone and
        the caller holds their locks); before :meth:`lock`."""
        assert self.journal.fd is None, "replay_also() after lock()"
        self._replay = [*self._replay, *directories]

    def lock(self) -> "Intake":
        """Take the journal directory (its lock and stream): before anything else, so
        that a second process configured with the same journal is refused at once.
        Raises JournalBusy when another process holds it."""
        if self.journal.fd is None:
            self._replay_files = [p for d in self._replay for p in J.list_files(d)]
            self.journal.open()
        return self

    def unlock(self) -> None:
        """Give the directory back without having started (a start that failed)."""
        self.journal.close()

    def start(self, refresh: Any = None) -> "Intake":
        """Take the journal directory if not yet done, start committing (what earlier
        runs left first), write the counters; ``refresh()`` updates counters kept
        elsewhere before each stats write.  Raises JournalBusy when another process
        holds the directory."""
        self.lock()
        replay = self._replay_files
        self.client, coll = mongo_collection(self.config)
        gevent.spawn(self._connect)
        self.committer = Committer(coll, self.journal, replay, self.stats, self.rejects)
        self.committer.start()
        write_stats(self.stats_file, self.stats)
        self._stats_loop = loops.spawn(f"{self.name}: stats loop", write_loop,
                                       self.stats_file, self.stats, STATS_INTERVAL, refresh)
        return self

    def _connect(self) -> None:
        # Why: discover the server and open a connection before the first burst, whose
        # commit would otherwise wait a second or so for it.
        assert self.client is not None, "connected in start()"
        try:
            self.client.admin.command("ping")
        except Exception as e:  # noqa: BLE001 - only a warning: the committer retries
            log.warning("%s: the database does not answer yet (%s); events are journaled",
                        self.name, e)

    @contextlib.contextmanager
    def appending(self) -> Iterator[Stream]:
        """Hold the journal while positions are handed out and appended; yields the
        stream that gives them."""
        with self.journal.appending:
            yield self.journal.stream

    def append(self, docs: list[bytes], wait: bool = False) -> None:
        """Accept prepared events: write them to the journal (one write).

        Raises OSError when the journal cannot be written, unless ``wait``: then the
        write is tried again every :data:`RETRY_WRITE` seconds until it succeeds
        (why: the messages were taken off a socket, and ZeroMQ meanwhile queues the
        next ones and then pushes back on the senders).
        """
        while True:
            try:
                self.journal.append(docs)
                break
            except OSError as e:
                if not wait:
                    raise
                log.error("%s: cannot write the journal (%s); retrying in a second",
                          self.name, e)
                gevent.sleep(RETRY_WRITE)
        self.stats.accepted += len(docs)

    def reject(self, source: str, data: bytes, reason: str) -> None:
        """Set aside a message that is not an accepted event, with its reason."""
        self.rejects.add(source, data, reason)

    def stop(self, timeout: float = 10.0) -> bool:
        """Close the journal and commit what it holds within ``timeout``.

        Returns True when everything journaled was committed (the rest is replayed
        at the next start).
        """
        if self.committer is None:
            return True
        deadline = time.monotonic() + timeout
        self.journal.close()
        ok = self.committer.stop(max(1.0, deadline - time.monotonic()))
        if self._stats_loop is not None:
            self._stats_loop.kill()
        self.stats.backlog_files = len(self.committer.backlog)
        try:
            write_stats(self.stats_file, self.stats)
        except OSError as e:
            log.error("%s: cannot write the stats file: %s", self.name, e)
        if self.client is not None:
            self.client.close()
        self.committer = None
        s = self.stats
        log.info("%s stopped: accepted %d, rejected %d, committed %d%s", self.name,
                 s.accepted, s.rejected, s.committed,
                 "" if ok else "; the rest stays in the journal for the next start")
        return ok
