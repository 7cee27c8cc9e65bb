"""Events received over HTTP: validated as the JSON socket validates them, journaled,
committed by the event logger's own parts.

The web service has an intake of its own, so that it works alone (``zcmd
web-server``) as inside ``zcmd serve`` without a new socket: a durable
:class:`~zarkov.eventlog.intake.Intake` (journal, committer, counters, rejects) in
``<journal>/web-<port>/``, whose stats file is ``<journal>/web-<port>/stats-0.json``.
:meth:`WebIntake.accept` returns once the events are written to the journal, so the
202 that follows acknowledges nothing that a crash could lose.  What the intakes of
other ports left journaled (``web_port`` changed after a crash or an outage) is
committed too: at start, the intake takes the lock of each ``web-<port>/`` directory
that no running process holds and replays its files.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

from zarkov import config as C
from zarkov.eventlog import journal as J
from zarkov.eventlog import stream as S
from zarkov.eventlog.intake import Intake
from zarkov.eventlog.schema import Rejected, event_from_json, now_millis, prepare_doc
from zarkov.eventlog.stats import stats_path
from zarkov.eventlog.stream import Stream

SOURCE = "http"

log = logging.getLogger("zarkov.web.intake")


def intake_dir(journal_dir: str, port: int) -> str:
    """The journal directory of the web intake listening on ``port``."""
    return os.path.join(journal_dir, f"web-{port}")


def former_dirs(journal_dir: str, own: str) -> list[tuple[str, int]]:
    """The directories of web intakes on other ports that hold journal files and that
    no process holds, each with its lock now taken (released by :func:`S.unlock`)."""
    out: list[tuple[str, int]] = []
    try:
        names = sorted(os.listdir(journal_dir))
    except FileNotFoundError:
        return out
    for name in names:
        path = os.path.join(journal_dir, name)
        if not (name.startswith("web-") and name[4:].isdigit()) or path == own:
            continue
        if not J.list_files(path):
            continue
        try:
            fd = S.lock(path)
        except S.JournalBusy:
            continue  # a web service on that port runs: its own intake commits it
        out.append((path, fd))
    return out


class WebIntake:
    """The HTTP event intake of one web-service process (start it under gevent): a
    durable :class:`~zarkov.eventlog.intake.Intake` of its own, in
    ``<journal>/web-<port>/``."""

    def __init__(self, config: C.Config, port: int):
        self.config = config
        self.directory = intake_dir(config.journal, port)
        self._former: list[tuple[str, int]] = []
        self.intake = Intake(config, self.directory, stats_path(self.directory, 0),
                             "web intake")

    @property
    def stats(self):
        """The intake's counters."""
        return self.intake.stats

    def start(self) -> "WebIntake":
        """Open the journal, replay what an earlier run left (on this port or another
        that no process serves now), start committing."""
        self._former = former_dirs(self.config.journal, self.directory)
        if self._former:
            log.info("web intake: replaying the journal of %s",
                     ", ".join(os.path.basename(d) for d, _ in self._former))
        # The other directories stay locked until this intake stops: no second web
        # service replays them meanwhile.
        self.intake.replay_also([d for d, _ in self._former])
        try:
            self.intake.start()
        except BaseException:
            self._release()
            raise
        return self

    def _release(self) -> None:
        for _, fd in self._former:
            S.unlock(fd)
        self._former = []

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
        try:
            return self.intake.stop(timeout)
        finally:
            self._release()


class BadEvent(Rejected):
    """One event of a request is not valid; ``index`` says which."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"event {index}: {reason}")
        self.index = index
        self.reason = reason
