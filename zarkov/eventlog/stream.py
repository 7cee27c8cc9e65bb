"""The stream of one journal directory: who may write it, and the next position.

Every journal directory (an event server's ``server-<i>``, a web intake's
``web-<port>``) is written by one process at a time and gives the events it
journals positions of one stream (:mod:`zarkov.positions`):

* **one writer**: the process holds an exclusive ``flock`` on ``<dir>/lock`` for as
  long as it uses the directory (the kernel drops it when the process dies), so two
  processes configured with the same journal never hand out the same positions;
* **a stream that survives a clean stop**: stopping writes ``<dir>/stream.json``
  (the stream id and the next sequence number) and starting reads and removes it,
  so a restart after a clean stop goes on with the same stream.  After a crash the
  file is not there and a new stream begins: the numbers of the old one that were
  handed out are unknown, so none can be handed out again.  The old stream's
  events still in the journal are committed by the new process, with their own
  positions (they are in their ``_id``);
* a stream that runs out of numbers (:data:`zarkov.positions.SEQ_MAX`) is followed
  by a new one.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import struct
from typing import Optional

from zarkov import positions
from zarkov.errors import ZarkovError

LOCK = "lock"
STATE = "stream.json"
_SEQ = struct.Struct(">I")

log = logging.getLogger("zarkov.eventlog")


class JournalBusy(ZarkovError):
    """Another process is using the journal directory."""


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock(directory: str) -> int:
    """Take the exclusive lock of ``directory`` (created if missing); return its fd.

    Raises JournalBusy when another process holds it.
    """
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise JournalBusy(f"journal directory {directory} is in use by another "
                              f"process (two event loggers with the same 'journal'?)") from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def unlock(fd: Optional[int]) -> None:
    """Release a lock taken with :func:`lock`."""
    if fd is not None:
        os.close(fd)


class Stream:
    """The positions handed out by the process that holds one journal directory."""

    def __init__(self, directory: str):
        self.directory = directory
        self.stream = b""
        #: The last sequence number handed out (0: none yet).
        self.seq = 0
        self._lock: Optional[int] = None

    @classmethod
    def detached(cls) -> "Stream":
        """A stream of its own, locked and kept nowhere (for code that journals nothing)."""
        s = cls("")
        s.stream = positions.new_stream()
        return s

    def open(self) -> "Stream":
        """Lock the directory; go on with the stream a clean stop left, else a new one.

        Raises JournalBusy when another process holds the directory.
        """
        self._lock = lock(self.directory)
        path = os.path.join(self.directory, STATE)
        try:
            with open(path) as f:
                state = json.load(f)
            self.stream = positions.stream_of(state["stream"])
            self.seq = int(state["next"]) - 1
            if not 0 <= self.seq <= positions.SEQ_MAX:
                raise ValueError(f"next {state['next']} is out of range")
        except FileNotFoundError:
            self._begin("no stream was left by a clean stop")
        except (ValueError, KeyError, TypeError) as e:
            self._begin(f"{path} cannot be used ({e})")
        else:
            log.debug("journal %s: stream %s goes on from %d", self.directory,
                      positions.key(self.stream), self.seq + 1)
        try:  # why: a crash from now on must not find it and hand out numbers again
            os.unlink(path)
            _fsync_dir(self.directory)
        except FileNotFoundError:
            pass
        return self

    def _begin(self, why: str) -> None:
        self.stream = positions.new_stream()
        self.seq = 0
        log.info("journal %s: new stream %s (%s)", self.directory, positions.key(self.stream),
                 why)

    def take(self) -> tuple[bytes, int]:
        """The next position: (the 12 bytes of its ObjectId, its sequence number)."""
        seq = self.seq = self.seq + 1
        if seq > positions.SEQ_MAX:
            self._begin("the last one ran out of numbers")
            seq = self.seq = 1
        # Why not positions.id_bytes: once per event, a call costs as much as the rest.
        return self.stream + _SEQ.pack(seq), seq

    def close(self) -> None:
        """Record the stream for the next start (a clean stop) and unlock."""
        if self._lock is None:
            return
        path = os.path.join(self.directory, STATE)
        try:
            with open(path + ".tmp", "w") as f:
                json.dump({"stream": positions.key(self.stream), "next": self.seq + 1}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + ".tmp", path)
            _fsync_dir(self.directory)
        except OSError as e:  # the next start begins a new stream: nothing is lost
            log.error("journal %s: cannot record its stream (%s)", self.directory, e)
        finally:
            unlock(self._lock)
            self._lock = None

