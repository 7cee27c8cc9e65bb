"""Writing a job's outputs: ``replace``, ``merge`` and ``reduce`` (README, "The
map-reduce protocol").

Only the router writes outputs, one job's documents once each, so no two
processes ever update the same output document at once (the bundled FerretDB
loses one of two concurrent read-modify-write updates of a document).

Nothing here runs before every map, reduce and finalize has succeeded: a failed
job leaves its output collections as they were.  How the documents are written —
built aside and renamed over the target, or overwritten in place; replace-upserts
or delete + insert — is chosen by :mod:`zarkov.storage` from what the server can
do, the same way for every part of Zarkov.
"""
from __future__ import annotations

from typing import Callable, Optional

from bson.raw_bson import RawBSONDocument

from zarkov.storage.writes import Batches, Writes

COMMIT_BATCH = 1000  # output documents per write / per re-reduce task


def temp_name(job_id: str, index: int) -> str:
    """The collection a ``replace`` job builds output ``index`` in."""
    return f"zmr.tmp.{job_id}.{index}"


def write(writes: Writes, output_type: str, outputs: dict[str, Batches],
          aside: Callable[[str], str], on_written: Callable[[int], None]) -> Optional[str]:
    """Write every output; return the path :mod:`zarkov.storage` took (None: no output).

    ``replace`` makes each target hold exactly its documents; ``merge`` and
    ``reduce`` (whose values were already folded in, see the job's re-reduce)
    write each document over the one with the same ``_id``.
    """
    if output_type == "replace":
        return writes.replace(outputs, aside, on_written)
    path = None
    for target, batches in outputs.items():
        path = writes.overwrite(target, batches, on_written)
    return path


def existing(coll, batch: list[bytes]) -> bytes:
    """The stored documents with the ``_id``s of ``batch``, as concatenated raw BSON."""
    ids = [RawBSONDocument(raw)["_id"] for raw in batch]
    return b"".join(coll.find_raw_batches({"_id": {"$in": ids}}))
