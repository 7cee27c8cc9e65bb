"""Events received over HTTP: validated as the JSON socket validates them, journaled,
committed by the event logger's own parts.

The web service has an intake of its own, so that it works alone (``zcmd
web-server``) as inside ``zcmd serve`` without a new socket: a durable
:class:`~zarkov.eventlog.intake.Intake` (journal, committer, counters, rejects) in
``<journal>/web-<port>/``, whose stats file is ``<journal>/web-<port>/stats-0.json``.
:meth:`WebIntake.accept` returns once the events are written to the journal, so the
202 that follows acknowledges nothing that a crash could lose.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

from zarkov import config as C
from zarkov.eventlog.intake import Intake
from zarkov.eventlog.schema import Rejected, event_from_json, now_millis, prepare_doc
from zarkov.eventlog.stats import stats_path
from zarkov.eventlog.stream import Stream

SOURCE = "http"

log = logging.getLogger("zarkov.web.intake")


def intake_dir(journal_dir: str, port: int) -> str:
    """The journal directory of the web intake listening on ``port``."""
    return os.path.join(journal_dir, f"web-{port}")


class WebIntake:
    """The HTTP event intake of one web-service process (start it under gevent): a
    durable :class:`~zarkov.eventlog.intake.Intake` of its own, in
    ``<journal>/web-<port>/``."""

    def __init__(self, config: C.Config, port: int):
        self.config = config
        self.directory = intake_dir(config.journal, port)
        self.intake = Intake(config, self.directory, stats_path(self.directory, 0),
                             "web intake")

    @property
    def stats(self):
        """The intake's counters."""
        return self.intake.stats

    def start(self) -> "WebIntake":
        """Open the journal, replay what an earlier run left, start committing."""
        self.intake.start()
        return self

    def accept(self, items: list, body: Optional[bytes] = None) -> int:
        """Journal parsed JSON events, all or none; return how many.

        Raises BadEvent (with the index) on the first bad one, after recording every
        bad one in the rejects file (as ``body`` when the request held that one event,
        else as its JSON), and OSError when the journal cannot be written.
        """
        with self.intake.appending() as ids:
            docs = self._prepare(items, body, ids)
            self.intake.append(docs)
        return len(docs)

    def _prepare(self, items: list, body: Optional[bytes], ids: Stream) -> list[bytes]:
        now = now_millis()
        docs, first = [], None
        for i, item in enumerate(items):
            try:
                docs.append(prepare_doc(event_from_json(item), now, ids))
            except Rejected as e:
                text = body if body is not None else json.dumps(item).encode()
                self.intake.reject(SOURCE, text, str(e))
                if first is None:
                    first = BadEvent(i, str(e))
        if first is not None:
            raise first
        return docs

    def reject(self, data: bytes, reason: str) -> None:
        """Record a request body that holds no event at all (not JSON, empty ...)."""
        self.intake.reject(SOURCE, data, reason)

    def stop(self, timeout: float = 10.0) -> bool:
        """Close the journal and commit what it holds within ``timeout``; True if all was."""
        return self.intake.stop(timeout)


class BadEvent(Rejected):
    """One event of a request is not valid; ``index`` says which."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"event {index}: {reason}")
        self.index = index
        self.reason = reason
