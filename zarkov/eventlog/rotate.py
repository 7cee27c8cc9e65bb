"""Rotate the event collections: ``event`` → ``event.0`` → ``event.1`` … (SPEC §1).

``num_event_logs`` rotated collections are kept (``event.0`` … ``event.<k-1>``).  The
one that would fall off the end is first written to the dump directory as a BSON
file (documents back to back, as ``mongodump`` writes them), then dropped.  Renames
go from the oldest to the newest so that no rename ever lands on an existing
collection (FerretDB has no ``renameCollection`` with ``dropTarget``).

Where the server refuses the rename itself (FerretDB 1.24 refuses collection names
with a dot in ``renameCollection``), documents are moved in batches instead: inserted
into the target (a duplicate key counts as done, so a rerun after a crash completes
the move) and then deleted from the source by ``_id``; ``event`` is never dropped,
so events the logger inserts meanwhile stay in it.  Either way the new ``event``
has the indexes the old one had.
"""
from __future__ import annotations

import datetime as dt
import os

from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo.database import Database
from pymongo.errors import BulkWriteError, OperationFailure

COLLECTION = "event"
MOVE_BATCH = 5000
INVALID_NAMESPACE = 73


class RotateError(Exception):
    """The collections are not in a state rotate can work from; the message says why."""


def dump_collection(db: Database, name: str, dump_dir: str) -> tuple[str, int]:
    """Write every document of ``name`` to ``<dump_dir>/<db>.<name>.<UTC time>.bson``.

    Returns (path, number of documents).  The file appears complete or not at all.
    """
    os.makedirs(dump_dir, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = os.path.join(dump_dir, f"{db.name}.{name}.{stamp}.bson")
    raw = db.get_collection(name, codec_options=CodecOptions(document_class=RawBSONDocument))
    count = 0
    with open(path + ".tmp", "wb") as f:
        for doc in raw.find(batch_size=5000):
            f.write(doc.raw)
            count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return path, count


def _copy_indexes(db: Database, source: str, target: str) -> list[str]:
    made = []
    for name, info in db[source].index_information().items():
        if name == "_id_":
            continue
        options = {k: v for k, v in info.items() if k not in ("key", "v", "ns")}
        db[target].create_index(info["key"], name=name, **options)
        made.append(name)
    return made


def _move_documents(db: Database, source: str, target: str) -> int:
    _copy_indexes(db, source, target)
    raw = db.get_collection(source, codec_options=CodecOptions(document_class=RawBSONDocument))
    moved = 0
    while True:
        batch = list(raw.find().sort("_id", 1).limit(MOVE_BATCH))
        if not batch:
            return moved
        try:
            db[target].insert_many(batch, ordered=False)
        except BulkWriteError as e:
            if any(x.get("code") != 11000 for x in e.details.get("writeErrors", [])):
                raise
        db[source].delete_many({"_id": {"$in": [d["_id"] for d in batch]}})
        moved += len(batch)


def _move(db: Database, source: str, target: str) -> str:
    """Rename ``source`` to ``target``, or move its documents where renaming is refused."""
    try:
        db[source].rename(target)
    except OperationFailure as e:
        if e.code != INVALID_NAMESPACE:
            raise
        moved = _move_documents(db, source, target)
        if source != COLLECTION:
            db.drop_collection(source)
        return f"moved {moved} documents from {source} to {target} (rename refused: {e.details.get('errmsg')})"
    if source == COLLECTION:
        _copy_indexes(db, target, COLLECTION)
    return f"renamed {source} to {target}"


def rotate(db: Database, dump_dir: str, keep: int) -> list[str]:
    """Rotate the event collections of ``db``, keeping ``keep``; returns what was done."""
    if keep < 1:
        raise RotateError(f"num_event_logs must be at least 1, got {keep}")
    names = set(db.list_collection_names())
    done: list[str] = []
    chain = [COLLECTION] + [f"{COLLECTION}.{i}" for i in range(keep)]
    oldest = chain[-1]
    if oldest in names:
        path, count = dump_collection(db, oldest, dump_dir)
        done.append(f"dumped {oldest} ({count} documents) to {path}")
        db.drop_collection(oldest)
        done.append(f"dropped {oldest}")
        names.discard(oldest)
    for newer, older in reversed(list(zip(chain, chain[1:]))):
        if newer not in names:
            continue
        if older in names:
            raise RotateError(f"{db.name}.{older} exists while {newer} is to be renamed "
                              "to it: was a rotate interrupted? move one of them away")
        done.append(_move(db, newer, older))
        names.discard(newer)
        names.add(older)
    return done
