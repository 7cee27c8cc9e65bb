"""A job's files under ``job_root/<job_id>/``: partition data and staged outputs.

Map results are appended to ``part-NNNN`` as they arrive, so the router holds no
more than the chunks in flight however large the input; reduce outputs go to
``out-NNN`` (one per output collection).  Files are concatenated BSON documents.
The directory is removed when the job ends, whatever the outcome.
"""
from __future__ import annotations

import os
import shutil
import struct
from itertools import islice
from typing import Iterator

from zarkov.errors import ZarkovError

_LEN = struct.Struct("<i")


class SpillError(ZarkovError):
    """A spill file that does not hold whole BSON documents."""


class Spill:
    """The directory of one job's temporary files."""

    def __init__(self, root: str, job_id: str):
        self.dir = os.path.join(root, job_id)
        os.makedirs(self.dir, exist_ok=True)

    def path(self, name: str) -> str:
        """The full path of one file of the job."""
        return os.path.join(self.dir, name)

    def append(self, name: str, data: bytes) -> None:
        """Append ``data`` to file ``name`` (created when missing)."""
        # Opened per call: a job may have hundreds of partitions and many jobs may
        # run at once; holding them all open would run into the descriptor limit.
        with open(self.path(name), "ab") as f:
            f.write(data)

    def names(self, prefix: str) -> list[str]:
        """The job's files whose name starts with ``prefix``, sorted."""
        return sorted(n for n in os.listdir(self.dir) if n.startswith(prefix))

    def read(self, name: str) -> bytes:
        """The whole content of one file."""
        with open(self.path(name), "rb") as f:
            return f.read()

    def exists(self, name: str) -> bool:
        """Whether file ``name`` was written."""
        return os.path.exists(self.path(name))

    def iter_batches(self, name: str, max_docs: int = 1000,
                     max_bytes: int = 4 << 20) -> Iterator[list[bytes]]:
        """The documents of file ``name`` as lists of raw BSON, bounded in count and size."""
        docs = iter_docs(self.path(name))
        while True:
            batch, size = [], 0
            for doc in islice(docs, max_docs):
                batch.append(doc)
                size += len(doc)
                if size >= max_bytes:
                    break
            if not batch:
                return
            yield batch

    def remove(self) -> None:
        """Delete the job's directory and everything in it."""
        shutil.rmtree(self.dir, ignore_errors=True)


def iter_docs(path: str) -> Iterator[bytes]:
    """The raw BSON documents of a file, one at a time (the file is not loaded whole)."""
    with open(path, "rb") as f:
        while True:
            head = f.read(4)
            if not head:
                return
            if len(head) < 4:
                raise SpillError(f"{path}: truncated document length")
            (n,) = _LEN.unpack(head)
            body = f.read(n - 4)
            if n < 5 or len(body) != n - 4:
                raise SpillError(f"{path}: truncated document")
            yield head + body


def clean(root: str) -> list[str]:
    """Remove every job directory under ``root`` (``zcmd zmr-clean``); return them."""
    if not os.path.isdir(root):
        return []
    removed = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
