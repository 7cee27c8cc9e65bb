"""Writing a job's outputs: ``replace``, ``merge`` and ``reduce`` (SPEC §4).

Only the router writes outputs, one job's documents once each, so no two
processes ever update the same output document at once (the bundled FerretDB
loses one of two concurrent read-modify-write updates of a document).

Nothing here runs before every map, reduce and finalize has succeeded: a failed
job leaves its output collections as they were.  ``replace`` builds the new
collection aside and renames it over the old one, so readers see the old or
the new content, never half of it (where the server cannot rename over a
collection, :func:`replace_in_place` does the next best thing).  Writes are
acknowledged and batched.
"""
from __future__ import annotations

import logging
import uuid
from typing import Callable, Iterable

from bson.raw_bson import RawBSONDocument
from pymongo import ReplaceOne
from pymongo.errors import OperationFailure

from zarkov.zmr.partition import group_key

log = logging.getLogger("zarkov.zmr.commit")


def temp_name(job_id: str, index: int) -> str:
    """The collection a ``replace`` job builds output ``index`` in."""
    return f"zmr.tmp.{job_id}.{index}"


def _docs(batch: list[bytes]) -> list[RawBSONDocument]:
    return [RawBSONDocument(raw) for raw in batch]


def insert(coll, batches: Iterable[list[bytes]], on_written: Callable[[int], None]) -> None:
    """Insert raw documents in batches (into a fresh collection: no conflicts)."""
    for batch in batches:
        coll.insert_many(_docs(batch), ordered=False)
        on_written(len(batch))


def swaps_documents(client) -> bool:
    """Whether to write over documents by delete + insert instead of replace-upserts.

    True on FerretDB 1.24: each update statement there is a transaction of its
    own (about 10 ms), and it holds one SQLite connection per statement until
    the command ends, out of a pool of 100 per database, so one update command
    of more than about 100 matching statements waits forever — and wedges the
    server.  Deleting then inserting a batch takes two commands and no update.
    MongoDB gets ReplaceOne upserts, atomic per document.
    """
    return "ferretdbVersion" in client.admin.command("buildInfo")


def upsert(coll, batches: Iterable[list[bytes]], on_written: Callable[[int], None],
           swap: bool = False) -> None:
    """Write each document over the one with the same ``_id`` (or insert it).

    With ``swap`` (see :func:`swaps_documents`), a batch's documents are deleted
    and inserted again: readers miss them between the two commands.
    """
    for batch in batches:
        docs = _docs(batch)
        if swap:
            coll.delete_many({"_id": {"$in": [d["_id"] for d in docs]}})
            coll.insert_many(docs, ordered=False)
        else:
            coll.bulk_write([ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs],
                            ordered=False)
        on_written(len(docs))


def existing(coll, batch: list[bytes]) -> bytes:
    """The stored documents with the ``_id``s of ``batch``, as concatenated raw BSON."""
    ids = [RawBSONDocument(raw)["_id"] for raw in batch]
    return b"".join(coll.find_raw_batches({"_id": {"$in": ids}}))


def rename_over(client, database: str, source: str, target: str) -> None:
    """Rename collection ``source`` to ``target``, replacing ``target`` in one step."""
    client.admin.command({"renameCollection": f"{database}.{source}",
                          "to": f"{database}.{target}", "dropTarget": True})


def can_rename_over(client, database: str) -> bool:
    """Whether the server renames a dotted collection name over an existing one.

    MongoDB does.  FerretDB 1.24 implements neither ``dropTarget`` (its issue
    2565) nor renames of names with a dot (every ``zagg.*``), so there
    :func:`replace_in_place` stands in for build-aside-and-rename.
    """
    a, b = f"zmr.probe.{uuid.uuid4().hex}.a", f"zmr.probe.{uuid.uuid4().hex}.b"
    db = client[database]
    try:
        db[a].insert_one({"_id": 1})
        db[b].insert_one({"_id": 2})
        rename_over(client, database, a, b)
        return db[b].find_one({"_id": 1}) is not None
    except OperationFailure as e:
        log.info("%s: cannot rename over a collection (%s); replace writes in place", database, e)
        return False
    finally:
        drop_quietly(db, [a, b])


def replace_in_place(coll, batches: Iterable[list[bytes]], on_written: Callable[[int], None],
                     swap: bool = False) -> None:
    """``replace`` without a rename: write every new document, then delete the rest.

    Readers never see the collection empty or missing, and every document they
    see is either the old or the new one; during the write they may see a mix
    (and, with ``swap``, miss the documents of the batch being written).
    """
    keep = set()

    def remembered(batches):
        for batch in batches:
            keep.update(group_key(RawBSONDocument(raw)["_id"]) for raw in batch)
            yield batch

    upsert(coll, remembered(batches), on_written, swap)
    stale = [d["_id"] for d in coll.find({}, {"_id": 1}) if group_key(d["_id"]) not in keep]
    for i in range(0, len(stale), 1000):
        coll.delete_many({"_id": {"$in": stale[i:i + 1000]}})


def drop_quietly(db, names: Iterable[str]) -> None:
    """Drop temporary collections, ignoring errors (used while cleaning up)."""
    for name in names:
        try:
            db.drop_collection(name)
        except Exception as e:  # noqa: BLE001 - cleanup must not hide the job's outcome
            log.warning("could not drop temporary collection %s: %s", name, e)
