"""Events received over HTTP: validated as the JSON socket validates them, journaled,
committed by the event logger's own parts.

The web service has an intake of its own, so that it works alone (``zcmd
web-server``) as inside ``zcmd serve`` without a new socket: a write-ahead
:class:`~zarkov.eventlog.journal.Journal` in ``<journal>/web-<port>/``, a
:class:`~zarkov.eventlog.committer.Committer` moving it into ``event`` (replaying
what an earlier run left there on start), the stats file
``<journal>/web-<port>/stats-0.json`` and the event logger's rejects file.
:meth:`WebIntake.accept` returns once the events are written to the journal, so the
202 that follows acknowledges nothing that a crash could lose.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

import gevent

from zarkov import config as C
from zarkov import supervise
from zarkov.eventlog import journal as J
from zarkov.eventlog.committer import Committer
from zarkov.eventlog.rejects import RejectLog, rejects_path
from zarkov.eventlog.schema import Rejected, event_from_json, now_millis, prepare_doc
from zarkov.eventlog.server import STATS_INTERVAL, mongo_collection
from zarkov.eventlog.stats import Stats, stats_path, write_loop, write_stats

SOURCE = "http"

log = logging.getLogger("zarkov.web.intake")


def intake_dir(journal_dir: str, port: int) -> str:
    """The journal directory of the web intake listening on ``port``."""
    return os.path.join(journal_dir, f"web-{port}")


class WebIntake:
    """The HTTP event intake of one web-service process (start it under gevent)."""

    def __init__(self, config: C.Config, port: int):
        self.config = config
        self.directory = intake_dir(config.journal, port)
        self.stats = Stats(0)
        os.makedirs(config.journal, exist_ok=True)
        self.rejects = RejectLog(rejects_path(config.journal), self.stats)
        self.journal = J.Journal(self.directory, config.journal_file_size)
        self.committer: Optional[Committer] = None
        self.client = None
        self._stats_greenlet: Optional[gevent.Greenlet] = None

    def start(self) -> "WebIntake":
        """Open the journal, replay what an earlier run left, start committing."""
        replay = J.list_files(self.directory)
        self.journal.open()
        self.client, coll = mongo_collection(self.config)
        self.committer = Committer(coll, self.journal, replay, self.stats, self.rejects)
        self.committer.start()
        path = stats_path(self.directory, 0)
        write_stats(path, self.stats)
        self._stats_greenlet = supervise.spawn("web intake: stats loop", write_loop, path,
                                               self.stats, STATS_INTERVAL)
        return self

    def accept(self, items: list, body: Optional[bytes] = None) -> int:
        """Journal parsed JSON events, all or none; return how many.

        Raises BadEvent (with the index) on the first bad one, after recording every
        bad one in the rejects file (as ``body`` when the request held that one event,
        else as its JSON), and OSError when the journal cannot be written.  Positions
        are handed out and journaled under the journal's lock, so that the journal
        holds them in order whatever other requests do meanwhile.
        """
        with self.journal.appending:
            docs = self._prepare(items, body)
            self.journal.append([J.frame(d) for d in docs], len(docs))
        self.stats.accepted += len(docs)
        return len(docs)

    def _prepare(self, items: list, body: Optional[bytes]) -> list[bytes]:
        now = now_millis()
        docs, first = [], None
        for i, item in enumerate(items):
            try:
                docs.append(prepare_doc(event_from_json(item), now, self.journal.stream))
            except Rejected as e:
                text = body if body is not None else json.dumps(item).encode()
                self.rejects.add(SOURCE, text, str(e))
                if first is None:
                    first = BadEvent(i, str(e))
        if first is not None:
            raise first
        return docs

    def reject(self, data: bytes, reason: str) -> None:
        """Record a request body that holds no event at all (not JSON, empty ...)."""
        self.rejects.add(SOURCE, data, reason)

    def stop(self, timeout: float = 10.0) -> bool:
        """Close the journal and commit what it holds within ``timeout``; True if all was."""
        if self.committer is None:
            return True
        deadline = time.monotonic() + timeout
        self.journal.close()
        ok = self.committer.stop(max(1.0, deadline - time.monotonic()))
        if self._stats_greenlet is not None:
            self._stats_greenlet.kill()
        self.stats.backlog_files = len(self.committer.backlog)
        write_stats(stats_path(self.directory, 0), self.stats)
        self.client.close()
        self.committer = None
        log.info("web intake stopped: accepted %d, rejected %d, committed %d%s",
                 self.stats.accepted, self.stats.rejected, self.stats.committed,
                 "" if ok else "; the rest stays in the journal for the next start")
        return ok


class BadEvent(Rejected):
    """One event of a request is not valid; ``index`` says which."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"event {index}: {reason}")
        self.index = index
        self.reason = reason
