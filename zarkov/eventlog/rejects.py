"""Rejected messages: counted, logged with a short excerpt, set aside in a file.

The rejects file (``rejects.jsonl`` under the journal directory) holds one JSON line
per rejected message: when, from which socket, why, its size and its bytes (base64,
the first MiB), so that an operator can see what was refused and resend it.  Each
line is written with one ``O_APPEND`` write, so several processes can share the file.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import time

from zarkov.eventlog.stats import Stats

KEEP_BYTES = 1 << 20
LOGS_PER_SECOND = 10

log = logging.getLogger("zarkov.eventlog")


def rejects_path(journal_dir: str) -> str:
    """The rejects file of a journal directory."""
    return os.path.join(journal_dir, "rejects.jsonl")


def excerpt(data: bytes, n: int = 60) -> str:
    """The first bytes of a message, printable."""
    text = repr(bytes(data[:n]))
    return text + ("..." if len(data) > n else "")


class RejectLog:
    """Counts rejects in ``stats`` and appends them to the rejects file."""

    def __init__(self, path: str, stats: Stats):
        self.path = path
        self.stats = stats
        self._window = 0
        self._logged = 0
        self._muted = 0

    def add(self, source: str, data: bytes, reason: str) -> None:
        """Record one rejected message from ``source`` ("bson", "json", "database")."""
        self.stats.rejected += 1
        self._log(source, data, reason)
        entry = {"at": dt.datetime.now(dt.timezone.utc).isoformat(), "source": source,
                 "reason": reason, "size": len(data),
                 "data_b64": base64.b64encode(bytes(data[:KEEP_BYTES])).decode("ascii")}
        if len(data) > KEEP_BYTES:
            entry["truncated"] = True
        line = (json.dumps(entry) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:
            log.error("cannot write the rejects file %s: %s", self.path, e)

    def _log(self, source: str, data: bytes, reason: str) -> None:
        # Why a limit: a sender gone mad must not flood the log; the count stays exact.
        second = int(time.monotonic())
        if second != self._window:
            if self._muted:
                log.warning("%d more rejected messages not logged", self._muted)
            self._window, self._logged, self._muted = second, 0, 0
        if self._logged >= LOGS_PER_SECOND:
            self._muted += 1
            return
        self._logged += 1
        log.warning("rejected %s message (%d bytes): %s: %s",
                    source, len(data), reason, excerpt(data))
