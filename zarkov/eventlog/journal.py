"""The write-ahead log: append-only files of checksummed, length-prefixed BSON.

Every accepted event is appended here before anything else happens to it, so an
event the logger has accepted survives a crash of the logger.  A journal directory
holds files named ``<sequence>.jnl``; each starts with an 8-byte magic and then holds
records ``<u32 length><u32 crc32><BSON document>``.  The writer appends to one open
file and moves on to a new one when the file reaches ``journal_file_size``; it never
appends to a file left by an earlier run (whose tail might be torn).

One process writes a journal directory at a time: :meth:`Journal.open` takes its
lock and its stream (:mod:`zarkov.eventlog.stream`), which gives the events their
positions.  Writers assign positions and append under :attr:`Journal.appending`, so
the journal holds each stream's positions in order — what lets the committer say
"stored up to here" after each insert.

Durability: records are written with one ``write`` per batch, straight to the
kernel, so a killed process loses nothing it wrote; ``fsync`` runs in gevent's
thread pool when a file is closed and at most every second otherwise, so an
operating-system crash may lose the last second or so.
"""
from __future__ import annotations

import collections
import os
import struct
import time
import zlib

import gevent
import gevent.event
import gevent.lock

from zarkov.eventlog.stream import Stream

MAGIC = b"ZJNL\x00\x01\r\n"
HEADER = struct.Struct("<II")
SUFFIX = ".jnl"
SYNC_INTERVAL = 1.0
APPENDS_KEPT = 4096   # recent appends remembered for the commit latency
#: Most bytes of appended documents kept in memory for the committer (see
#: :meth:`Journal.recorded`); beyond it, the committer reads the files back.
KEPT_BYTES = 64 << 20


def list_files(directory: str) -> list[str]:
    """The journal files of ``directory``, oldest first (missing directory: none)."""
    try:
        names = [n for n in os.listdir(directory) if n.endswith(SUFFIX)]
    except FileNotFoundError:
        return []
    names.sort(key=lambda n: int(n[:-len(SUFFIX)]) if n[:-len(SUFFIX)].isdigit() else -1)
    return [os.path.join(directory, n) for n in names]


def frame(doc: bytes) -> bytes:
    """One journal record holding the BSON document ``doc``."""
    return HEADER.pack(len(doc), zlib.crc32(doc)) + doc


def read_records(path: str, offset: int = 0, end: int | None = None
                 ) -> tuple[list[bytes], int, str | None]:
    """Read the records of ``path`` from byte ``offset`` up to ``end`` (default: EOF).

    Returns ``(documents, next_offset, problem)``: ``next_offset`` is where reading
    stopped; ``problem`` is None, or says why the rest of the file cannot be read (a
    torn or corrupt record).  An incomplete record at ``end`` is left for later.
    """
    with open(path, "rb") as f:
        if offset < len(MAGIC):
            head = f.read(len(MAGIC))
            if len(head) < len(MAGIC):
                return [], offset, None if MAGIC.startswith(head) else "bad magic"
            if head != MAGIC:
                return [], offset, "bad magic: not a Zarkov journal file"
            offset = len(MAGIC)
        f.seek(offset)
        data = f.read() if end is None else f.read(max(0, end - offset))
    docs = []
    view = memoryview(data)
    pos, n = 0, len(data)
    problem = None
    while pos + HEADER.size <= n:
        length, crc = HEADER.unpack_from(data, pos)
        start = pos + HEADER.size
        if start + length > n:
            if end is None:
                problem = f"torn record at byte {offset + pos}"
            break
        doc = bytes(view[start:start + length])
        if zlib.crc32(doc) != crc or length < 5:
            problem = f"corrupt record at byte {offset + pos}"
            break
        docs.append(doc)
        pos = start + length
    else:
        if end is None and pos != n:
            problem = f"torn record at byte {offset + pos}"
    return docs, offset + pos, problem


class Journal:
    """The writer of one journal directory (used by one process only)."""

    def __init__(self, directory: str, file_size: int):
        self.directory = directory
        self.file_size = file_size
        self.path: str | None = None
        self.size = 0
        self.fd: int | None = None
        self.closed: list[str] = []      # files full and closed, not yet committed
        self.last_append = 0.0           # monotonic time of the last append
        self.appended = 0                # records appended since start
        #: (path, end offset, monotonic time) of recent appends: the committer tells
        #: from them how long each batch waited to be stored (bounded: a stalled
        #: database must not grow it).
        self.appends: collections.deque[tuple[str, int, float]] = collections.deque(
            maxlen=APPENDS_KEPT)
        #: What this process appended and the committer has not yet stored: per file,
        #: (start offset, end offset, documents) of each append (see :meth:`recorded`).
        self._kept: dict[str, list[tuple[int, int, list[bytes]]]] = {}
        self._kept_bytes = 0
        self._sizes: dict[str, int] = {}   # the final size of each closed file kept
        self._seq = 0
        self._dirty = False
        self._syncer = None
        self.changed = gevent.event.Event()  # set on append and rotation
        #: The positions of this directory's events (set by :meth:`open`).
        self.stream = Stream(directory)
        #: Held from handing out positions to appending them (see the module docstring).
        self.appending = gevent.lock.RLock()

    def open(self) -> None:
        """Lock the directory, take its stream, open a new file after those there.

        Raises :class:`~zarkov.eventlog.stream.JournalBusy` when another process
        holds the directory.
        """
        self.stream.open()
        seqs = [int(os.path.basename(p)[:-len(SUFFIX)]) for p in list_files(self.directory)
                if os.path.basename(p)[:-len(SUFFIX)].isdigit()]
        self._seq = max(seqs, default=0)
        self._new_file()
        self._syncer = gevent.spawn(self._sync_loop)

    def _new_file(self) -> None:
        self._seq += 1
        self.path = os.path.join(self.directory, f"{self._seq:012d}{SUFFIX}")
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._write(MAGIC)
        self.size = len(MAGIC)

    def _write(self, data: bytes) -> None:
        assert self.fd is not None, "the journal is closed"
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def append(self, docs: list[bytes]) -> None:
        """Append the BSON documents ``docs`` as records, in one write; they are kept
        in memory for the committer (:meth:`recorded`).

        Raises OSError (the file unchanged) when the write fails; the caller may retry.
        """
        blob = b"".join([frame(d) for d in docs])
        try:
            self._write(blob)
        except OSError:
            # Why truncate: a partial write (disk full) would leave a torn record in
            # the middle of the file, and the records after it could not be read back.
            try:
                assert self.fd is not None
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass
            raise
        if self._kept_bytes < KEPT_BYTES:
            assert self.path is not None
            self._kept.setdefault(self.path, []).append((self.size, self.size + len(blob), docs))
            self._kept_bytes += len(blob)
        self.size += len(blob)
        self.appended += len(docs)
        self.last_append = time.monotonic()
        assert self.path is not None
        self.appends.append((self.path, self.size, self.last_append))
        self._dirty = True
        if self.size >= self.file_size:
            self.rotate()
        self.changed.set()

    def recorded(self, path: str, start: int, end: int | None = None) -> list[bytes] | None:
        """The documents of ``path`` from offset ``start`` to ``end`` (None: the end of
        a closed file) as appended, or None when they are not all kept in memory
        (then read them with :func:`read_records`).

        Why: reading back what this process has just written, checksums and all,
        costs about a tenth of the logger's time per event.
        """
        if end is None:
            end = self._sizes.get(path)
        parts = self._kept.get(path)
        if end is None or not parts:
            return None
        start = max(start, len(MAGIC))
        docs: list[bytes] = []
        at = start
        for first, last, appended in parts:
            if last <= start:
                continue
            if first < at == start:  # ``start`` inside an append: skip the records before
                pos, k = first, 0
                while pos < at:
                    pos += HEADER.size + len(appended[k])
                    k += 1
                if pos != at:
                    return None
                appended = appended[k:]
            elif first != at:  # a gap: that append was not kept
                return None
            docs.extend(appended)
            at = last
            if at >= end:
                break
        return docs if at == end else None

    def forget(self, path: str, offset: int | None = None) -> None:
        """Drop what is kept of ``path`` up to ``offset`` (None: all of it): stored."""
        parts = self._kept.get(path)
        if parts is None:
            return
        while parts and (offset is None or parts[0][1] <= offset):
            first, last, _ = parts.pop(0)
            self._kept_bytes -= last - first
        if not parts:
            del self._kept[path]
            self._sizes.pop(path, None)

    def has_records(self) -> bool:
        """True when the open file holds at least one record."""
        return self.size > len(MAGIC)

    def rotate(self) -> None:
        """Close the open file (it joins ``closed``) and open the next one."""
        old_fd, old_path = self.fd, self.path
        assert old_fd is not None and old_path is not None, "the journal is closed"
        if old_path in self._kept:
            self._sizes[old_path] = self.size
        self._new_file()
        self.closed.append(old_path)
        self._dirty = True
        gevent.spawn(self._sync_close, old_fd)
        self.changed.set()

    @staticmethod
    def _sync_close(fd: int) -> None:
        try:
            gevent.get_hub().threadpool.apply(os.fsync, (fd,))
        finally:
            os.close(fd)

    def _sync_loop(self) -> None:
        while self.fd is not None:
            gevent.sleep(SYNC_INTERVAL)
            self.sync()

    def sync(self) -> None:
        """fsync the open file when something was written since the last sync."""
        if self._dirty and self.fd is not None:
            self._dirty = False
            try:
                gevent.get_hub().threadpool.apply(os.fsync, (self.fd,))
            except OSError:  # the file was rotated and closed meanwhile: synced there
                pass

    def close(self) -> None:
        """Sync and close the open file; it joins ``closed`` when it holds records."""
        if self.fd is None:
            return
        if self._syncer is not None:
            self._syncer.kill(block=False)
        fd, path = self.fd, self.path
        assert path is not None
        self.fd = None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.size > len(MAGIC):
            self.closed.append(path)
            if path in self._kept:
                self._sizes[path] = self.size
        else:
            os.unlink(path)
        self.stream.close()
        self.changed.set()
