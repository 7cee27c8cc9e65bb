"""What the MongoDB server can do, and the one set of ways Zarkov writes with it.

Zarkov is written to what MongoDB >= 4.4 does.  The servers bundled for development
and tests (FerretDB 1.24 and mongo-java-server, see README "Servers") lack a few
things; every difference between servers lives here and nowhere else:

* :func:`capabilities` answers what a server and database can do, probed once per
  client, server and database and then kept for the life of the client.  Probes are
  harmless (two scratch collections and a rename); what no harmless probe can decide
  (FerretDB wedges on large update commands) is known by the server's name.
* :class:`Writes` holds the three write strategies built on those answers, used by
  the map-reduce router's commit (:mod:`zarkov.zmr.job`), the aggregation's apply step
  (:mod:`zarkov.agg.apply`) and rotate (:mod:`zarkov.eventlog.rotate`) alike:

  - **replace a collection** (:meth:`Writes.replace`, :meth:`Writes.replace_from`):
    build the new content aside and rename it over the target in one step; where the
    server cannot rename over a collection, write every new document over the old
    one and then delete the rest, so that readers never find the target empty;
  - **overwrite documents** (:meth:`Writes.overwrite`): ``ReplaceOne`` upserts in
    bulk, atomic per document; where update commands are costly and can wedge the
    server, delete then insert each batch;
  - **move documents** (:meth:`Writes.move`): rename the collection; where the server
    refuses, insert the documents into the target and delete them from the source,
    in batches, resumable after a crash.

Each strategy returns the name of the path it took (``RENAMED`` …), which the router
puts in a job's status and the aggregation in its result, so that tests can assert
which path ran on which server.
"""
from __future__ import annotations

import logging
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient, ReplaceOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError, OperationFailure

from zarkov.zmr.partition import group_key

log = logging.getLogger(__name__)

#: Paths the strategies take (see the module docstring).
RENAMED = "renamed over"
REPLACED_IN_PLACE = "replaced in place"
UPSERTS = "replace-upserts"
DELETE_INSERT = "delete+insert"
MOVED_BY_RENAME = "renamed"
MOVED_DOCUMENTS = "moved documents"

#: Documents per write command when the server takes large update commands.
BATCH = 1000
#: Statements per update command on FerretDB 1.24: each is a transaction holding one
#: of its 100 pooled SQLite connections until the command ends, so 100 or more in one
#: command never complete and wedge the whole server.
FERRETDB_UPDATE_BATCH = 50
#: Prefix of the probe's scratch collections.
PROBE_PREFIX = "zarkov.probe."

DUPLICATE_KEY = 11000

Batches = Iterable[list[bytes]]
OnWritten = Optional[Callable[[int], None]]


@dataclass(frozen=True)
class Identity:
    """Which server a client talks to."""

    #: ``MongoDB``, ``FerretDB`` or ``mongo-java-server``.
    server: str
    #: The server's own version (FerretDB's or mongo-java-server's, else MongoDB's).
    version: str
    #: The MongoDB version it reports, and its wire version.
    mongodb_version: str
    wire_version: int

    @property
    def label(self) -> str:
        """One line for people: ``FerretDB 1.24.2 (MongoDB 7.0.77, wire 21)``."""
        if self.server == "MongoDB":
            return f"MongoDB {self.version} (wire {self.wire_version})"
        return (f"{self.server} {self.version} (MongoDB {self.mongodb_version}, "
                f"wire {self.wire_version})")


@dataclass(frozen=True)
class Capabilities(Identity):
    """What one server (and database on it) can do, as far as Zarkov cares."""

    #: ``renameCollection`` of collections whose names contain a dot (``event.0``,
    #: ``zagg.*``) works.  Probed.
    renames_dotted: bool = False
    #: ... and with ``dropTarget`` over an existing collection, in one step.  Probed.
    renames_over: bool = False
    #: Update commands of hundreds of statements are cheap and safe.  By name: false on
    #: FerretDB, where probing it could wedge the server.
    bulk_updates: bool = False
    #: A single-document update is atomic: two concurrent ``$addToSet`` on one
    #: document both take effect.  By name: false on FerretDB (read-modify-write
    #: without a lock), which no probe could show reliably.
    atomic_updates: bool = False

    @property
    def update_batch(self) -> int:
        """Most statements to send in one update command."""
        return BATCH if self.bulk_updates else FERRETDB_UPDATE_BATCH


def identify(client: MongoClient) -> Identity:
    """Which server ``client`` talks to (from ``buildInfo`` and the wire handshake)."""
    info = client.admin.command("buildInfo")
    wire = max((d.max_wire_version or 0
                for d in client.topology_description.server_descriptions().values()),
               default=0)
    reported = str(info.get("version", "?"))
    if "ferretdbVersion" in info:
        return Identity("FerretDB", str(info["ferretdbVersion"]).lstrip("v"), reported, wire)
    if "mongoJavaServerVersion" in info:  # added by tools/java-server
        return Identity("mongo-java-server", str(info["mongoJavaServerVersion"]), reported,
                        wire)
    return Identity("MongoDB", reported, reported, wire)


def _probe_renames(db: Database) -> tuple[bool, bool]:
    """(renames dotted names, renames over an existing collection), on scratch names."""
    tag = uuid.uuid4().hex
    a, b, c = (f"{PROBE_PREFIX}{tag}.{x}" for x in "abc")
    try:
        db[a].insert_one({"_id": 1})
        db[b].insert_one({"_id": 2})
        try:
            db[a].rename(c)
        except OperationFailure as e:
            log.debug("%s: the server does not rename %s (%s)", db.name, a, e)
            return False, False
        try:
            db[b].rename(c, dropTarget=True)
        except OperationFailure as e:
            log.debug("%s: the server does not rename over a collection (%s)", db.name, e)
            return True, False
        return True, db[c].find_one({"_id": 2}) is not None
    finally:
        for name in (a, b, c):
            try:
                db.drop_collection(name)
            except OperationFailure as e:  # pragma: no cover - a scratch name stays behind
                log.warning("could not drop probe collection %s: %s", name, e)


_cache: "weakref.WeakKeyDictionary[MongoClient, dict[str, Capabilities]]" = (
    weakref.WeakKeyDictionary())
_lock = threading.Lock()


def capabilities(client: MongoClient, database: str) -> Capabilities:
    """What the server behind ``client`` can do in ``database`` (probed once, then kept)."""
    with _lock:
        known = _cache.setdefault(client, {})
        if database not in known:
            who = identify(client)
            renames_dotted, renames_over = _probe_renames(client[database])
            known[database] = Capabilities(**vars(who), renames_dotted=renames_dotted,
                                           renames_over=renames_over,
                                           bulk_updates=who.server != "FerretDB",
                                           atomic_updates=who.server != "FerretDB")
            log.debug("%s, database %s: %s", known[database].label, database, known[database])
        return known[database]


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
