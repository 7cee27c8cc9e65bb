"""The one set of ways Zarkov writes with a server (see :mod:`zarkov.storage`)."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

from bson.codec_options import CodecOptions
from bson.raw_bson import DEFAULT_RAW_BSON_OPTIONS, RawBSONDocument
from pymongo import ReplaceOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError

from zarkov.bsonkeys import group_key
from zarkov.storage.capabilities import BATCH, Capabilities, capabilities, log

#: Paths the strategies take (see the module docstring).
RENAMED = "renamed over"
REPLACED_IN_PLACE = "replaced in place"
UPSERTS = "replace-upserts"
DELETE_INSERT = "delete+insert"
MOVED_BY_RENAME = "renamed"
MOVED_DOCUMENTS = "moved documents"

DUPLICATE_KEY = 11000

Batches = Iterable[list[bytes]]
OnWritten = Optional[Callable[[int], None]]


def writes(db: Database) -> "Writes":
    """The write strategies for ``db``, from its server's capabilities."""
    return Writes(db, capabilities(db.client, db.name))


def raw_batches(coll, size: int = BATCH) -> Iterator[list[bytes]]:
    """Every document of ``coll`` as raw BSON, in lists of at most ``size``."""
    raw = coll.with_options(codec_options=CodecOptions(document_class=RawBSONDocument))
    batch: list[bytes] = []
    for doc in raw.find({}, batch_size=size):
        batch.append(doc.raw)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Raw(RawBSONDocument):
    """A raw document taken as it is: the bytes were checked where they were made.

    Why: ``RawBSONDocument()`` checks the size of the bytes it wraps again, twice the
    cost of this wrapper (0.37 against 0.16 us a document).
    """

    __slots__ = ()

    def __init__(self, raw: bytes):
        self._RawBSONDocument__raw = raw
        self._RawBSONDocument__inflated_doc = None
        self._RawBSONDocument__codec_options = DEFAULT_RAW_BSON_OPTIONS


def _raw_wrapper() -> type:
    # Why: _Raw sets RawBSONDocument's private slots; should a pymongo release name
    # them otherwise, inserts fall back to the public class instead of failing.
    try:
        probe = _Raw(b"\x0c\x00\x00\x00\x10n\x00\x01\x00\x00\x00\x00")
        if bytes(probe.raw[:1]) == b"\x0c" and probe["n"] == 1:
            return _Raw
    except Exception:  # noqa: BLE001 - any failure: use the public class
        pass
    return RawBSONDocument


_wrap = _raw_wrapper()


#: The most bytes of documents sent as one ``insert`` command by :func:`insert_raw`
#: (the command is one BSON document, at most 16 MiB).
COMMAND_BYTES = 8 << 20


def insert_raw(coll, docs: list[bytes]) -> None:
    """``insert_many(docs, ordered=False)`` of raw BSON documents, each with its ``_id``.

    Raises BulkWriteError (``writeErrors`` indexed into ``docs``) when the server
    refuses some documents, and what ``insert_many`` raises otherwise.  Why not
    ``insert_many``: up to :data:`COMMAND_BYTES`, one ``insert`` command skips the
    driver's per-document bookkeeping (client CPU per 250-byte event 1.2 against
    2.0 us); beyond that the driver splits the documents into messages.
    """
    if sum(map(len, docs)) > COMMAND_BYTES:
        coll.insert_many([RawBSONDocument(d) for d in docs], ordered=False)
        return
    command: dict = {"insert": coll.name, "documents": [_wrap(d) for d in docs],
                     "ordered": False}
    if not coll.write_concern.is_server_default:
        command["writeConcern"] = coll.write_concern.document
    reply = coll.database.command(command)
    errors = reply.get("writeErrors")
    concern = reply.get("writeConcernError")
    if errors or concern:
        raise BulkWriteError({"writeErrors": errors or [],
                              "writeConcernErrors": [concern] if concern else [],
                              "nInserted": reply.get("n", 0)})


def _rebatch(batches: Batches, size: int) -> Iterator[list[bytes]]:
    for batch in batches:
        for i in range(0, len(batch), size):
            yield batch[i:i + size]


def drop_quietly(db: Database, names: Iterable[str]) -> None:
    """Drop collections, logging errors (used while cleaning up after a failure)."""
    for name in names:
        try:
            db.drop_collection(name)
        except Exception as e:  # noqa: BLE001 - cleanup must not hide the real outcome
            log.warning("could not drop temporary collection %s: %s", name, e)


def copy_indexes(db: Database, source: str, target: str) -> None:
    """Create on ``target`` every index of ``source`` (same keys, names and options)."""
    for name, info in db[source].index_information().items():
        if name == "_id_":
            continue
        options = {k: v for k, v in info.items() if k not in ("key", "v", "ns")}
        db[target].create_index(info["key"], name=name, **options)


class Writes:
    """The write strategies of one database (see the module docstring)."""

    def __init__(self, db: Database, caps: Capabilities):
        self.db = db
        self.caps = caps

    # -- overwrite documents -----------------------------------------------------------
    def overwrite(self, target: str, batches: Batches, on_written: OnWritten = None) -> str:
        """Write each raw document over the one with the same ``_id`` (or insert it).

        ``ReplaceOne`` upserts where update commands are cheap: readers see every
        document old or new, never missing.  Elsewhere (FerretDB) each batch is
        deleted and inserted again: two commands instead of one slow statement per
        document, and readers may miss a batch's documents between the two.  Either
        way writing the same documents twice gives the same result.
        """
        coll = self.db[target]
        for batch in _rebatch(batches, BATCH):
            docs = [RawBSONDocument(raw) for raw in batch]
            if self.caps.bulk_updates:
                coll.bulk_write([ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs],
                                ordered=False)
            else:
                coll.delete_many({"_id": {"$in": [d["_id"] for d in docs]}})
                coll.insert_many(docs, ordered=False)
            if on_written is not None:
                on_written(len(docs))
        return UPSERTS if self.caps.bulk_updates else DELETE_INSERT

    # -- replace a collection ---------------------------------------------------------
    def replace(self, outputs: dict[str, Batches], aside: Callable[[str], str],
                on_written: OnWritten = None) -> str:
        """Make each target of ``outputs`` hold exactly its batches' documents.

        With renames over a collection, every output is first built in full in its
        collection ``aside(target)``, then each is renamed over its target: a failure
        while building leaves every target as it was, and readers see the old or the
        new content, never a mix.  Elsewhere: :meth:`_in_place` for each.
        """
        if not self.caps.renames_over:
            for target, batches in outputs.items():
                self._in_place(target, batches, on_written)
            return REPLACED_IN_PLACE
        built: list[tuple[str, str]] = []
        try:
            for target, batches in outputs.items():
                temp = aside(target)
                self.db.drop_collection(temp)
                built.append((temp, target))
                self.db.create_collection(temp)
                for batch in batches:
                    self.db[temp].insert_many([RawBSONDocument(r) for r in batch],
                                              ordered=False)
                    if on_written is not None:
                        on_written(len(batch))
            for temp, target in built:
                self._rename_over(temp, target)
        except BaseException:
            drop_quietly(self.db, [temp for temp, _ in built])
            raise
        return RENAMED

    def replace_from(self, staging: str, target: str,
                     on_batch: Optional[Callable[[int], None]] = None) -> str:
        """Make ``target`` hold exactly the documents of collection ``staging``, then
        drop ``staging``.  Idempotent until ``staging`` is gone: a rename over the
        target where the server can, else :meth:`_in_place` from the staging documents
        (``staging`` is dropped last, so a crash before that just means doing it again).
        """
        if self.caps.renames_over:
            self._rename_over(staging, target)
            if on_batch is not None:
                on_batch(0)
            return RENAMED
        self._in_place(target, raw_batches(self.db[staging]), on_batch)
        self.db.drop_collection(staging)
        return REPLACED_IN_PLACE

    def _rename_over(self, source: str, target: str) -> None:
        self.db.client.admin.command({"renameCollection": f"{self.db.name}.{source}",
                                      "to": f"{self.db.name}.{target}", "dropTarget": True})

    def _in_place(self, target: str, batches: Batches, on_written: OnWritten) -> None:
        """Replace without a rename: overwrite with every new document, delete the rest.

        Readers never find the target empty or missing, and every document they see is
        the old or the new one; while it runs they see a mix (and, where overwriting
        is delete + insert, may miss the documents of the batch being written).
        """
        keep = set()

        def remembered():
            for batch in batches:
                keep.update(group_key(RawBSONDocument(raw)["_id"]) for raw in batch)
                yield batch

        self.overwrite(target, remembered(), on_written)
        coll = self.db[target]
        # Ids listed before deleting: a multi-document write on FerretDB waits for
        # open cursors on its collection.
        stale = [d["_id"] for d in coll.find({}, {"_id": 1})
                 if group_key(d["_id"]) not in keep]
        for i in range(0, len(stale), BATCH):
            coll.delete_many({"_id": {"$in": stale[i:i + BATCH]}})
        if target not in self.db.list_collection_names():  # nothing written, nothing left
            self.db.create_collection(target)

    # -- move documents ---------------------------------------------------------------
    def move(self, source: str, target: str, drop_source: bool = True) -> str:
        """Move every document of ``source`` into ``target``, which must not exist.

        A rename where the server renames such names.  Elsewhere the documents are
        inserted into ``target`` in batches (a duplicate key means "moved before a
        crash") and deleted from ``source`` by ``_id``; ``source`` is dropped at the
        end when ``drop_source``, else left (empty, or with what others inserted
        meanwhile) with its indexes; ``target`` gets the same indexes.
        """
        if self.caps.renames_dotted:
            self.db[source].rename(target)
            return MOVED_BY_RENAME
        copy_indexes(self.db, source, target)
        raw = self.db.get_collection(
            source, codec_options=CodecOptions(document_class=RawBSONDocument))
        while True:
            batch = list(raw.find().sort("_id", 1).limit(5 * BATCH))
            if not batch:
                break
            try:
                self.db[target].insert_many(batch, ordered=False)
            except BulkWriteError as e:
                if any(x.get("code") != DUPLICATE_KEY for x in e.details.get("writeErrors", [])):
                    raise
            self.db[source].delete_many({"_id": {"$in": [d["_id"] for d in batch]}})
        if drop_source:
            self.db.drop_collection(source)
        return MOVED_DOCUMENTS
