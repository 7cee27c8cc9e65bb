"""Rotate the event collections: ``event`` → ``event.0`` → ``event.1`` … (README,
"Commands": ``zcmd rotate``).

``num_event_logs`` rotated collections are kept (``event.0`` … ``event.<k-1>``).  The
one that would fall off the end is first written to the dump directory as a BSON
file (documents back to back, as ``mongodump`` writes them), then dropped.  Renames
go from the oldest to the newest so that no rename ever lands on an existing
collection.  Each step moves one collection's documents to the next name with
:meth:`zarkov.storage.Writes.move`: a rename where the server can, else documents
moved in batches (a rerun after a crash completes the move); ``event`` itself is
never dropped then, so events the logger inserts meanwhile stay in it.  Either way
the new ``event`` has the indexes the old one had.
"""
from __future__ import annotations

import datetime as dt
import os

from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo.database import Database

from zarkov import storage

COLLECTION = "event"


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


def _move(db: Database, source: str, target: str) -> str:
    """Move ``source`` to ``target`` (see the module docstring); what was done."""
    how = storage.writes(db).move(source, target, drop_source=source != COLLECTION)
    if how == storage.MOVED_BY_RENAME:
        if source == COLLECTION:  # the logger's next inserts create it: same indexes
            storage.copy_indexes(db, target, COLLECTION)
        return f"renamed {source} to {target}"
    return f"moved the documents of {source} to {target} ({how}: the server does not rename it)"


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
