"""Rejected messages: counted, logged with a short excerpt, set aside in a file.

The rejects file (``rejects.jsonl`` under the journal directory) holds one JSON line
per rejected message: when, from which socket, why, its size and its bytes (base64,
the first MiB), so that an operator can see what was refused and resend it.  Each
line is written with one ``O_APPEND`` write, so several processes can share the file.

It is rotated like a log: once it holds ``rejects_file_size`` bytes it becomes
``rejects.jsonl.1`` (the older ones ``.2``, ``.3`` …) and a new one starts; the
``rejects_files`` newest are kept, the oldest deleted, so a sender gone mad cannot
fill the journal's disk.  The processes sharing the file rotate it under a lock
(``rejects.lock``), each checking the size again once it holds the lock; a line
written during a rotation lands whole in one file or the other.
"""
from __future__ import annotations

import base64
import datetime as dt
import fcntl
import json
import logging
import os
import time

from zarkov.eventlog.stats import Stats

KEEP_BYTES = 1 << 20
LOGS_PER_SECOND = 10
#: Defaults of the config keys ``rejects_file_size`` and ``rejects_files``.
FILE_SIZE = 16 << 20
FILES = 4

log = logging.getLogger("zarkov.eventlog")


def rejects_path(journal_dir: str) -> str:
    """The rejects file of a journal directory."""
    return os.path.join(journal_dir, "rejects.jsonl")


def excerpt(data: bytes, n: int = 60) -> str:
    """The first bytes of a message, printable."""
    text = repr(bytes(data[:n]))
    return text + ("..." if len(data) > n else "")


def rotate(path: str, keep: int) -> None:
    """Shift ``path`` to ``path.1`` (``.1`` to ``.2`` …), keeping ``keep`` old files."""
    for n in range(keep, 0, -1):
        older = f"{path}.{n}"
        if not os.path.exists(older):
            continue
        if n == keep:
            os.unlink(older)
        else:
            os.replace(older, f"{path}.{n + 1}")
    if keep > 0:
        os.replace(path, f"{path}.1")
    else:
        os.unlink(path)


class RejectLog:
    """Counts rejects in ``stats`` and appends them to the rejects file, rotated
    past ``file_size`` bytes with ``files`` old files kept."""

    def __init__(self, path: str, stats: Stats, file_size: int = FILE_SIZE,
                 files: int = FILES):
        self.path = path
        self.stats = stats
        self.file_size = file_size
        self.files = files
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
                full = os.fstat(fd).st_size >= self.file_size
            finally:
                os.close(fd)
            if full:
                self._rotate()
        except OSError as e:
            log.error("cannot write the rejects file %s: %s", self.path, e)

    def _rotate(self) -> None:
        lock = os.open(os.path.join(os.path.dirname(self.path), "rejects.lock"),
                       os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Another process may have rotated it while we waited for the lock.
            if os.path.exists(self.path) and os.path.getsize(self.path) >= self.file_size:
                rotate(self.path, self.files)
                log.info("rejects file %s rotated (%d kept)", self.path, self.files)
        finally:
            os.close(lock)  # releases the lock

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
