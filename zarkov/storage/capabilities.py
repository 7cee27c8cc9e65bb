"""What a MongoDB-wire server can do, probed once per client, server and database.

Probes are harmless (scratch collections and a rename); what no harmless probe can
decide (FerretDB wedges on large update commands; which reads its indexes serve) is
known by the server's name.  :mod:`zarkov.storage.writes` and
:mod:`zarkov.storage.reads` choose their ways from these answers.
"""
from __future__ import annotations

import logging
import threading
import uuid
import weakref
from dataclasses import dataclass

from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import OperationFailure

log = logging.getLogger("zarkov.storage")

#: Documents per write command when the server takes large update commands.
BATCH = 1000
#: Statements per update command on FerretDB 1.24: each is a transaction holding one
#: of its 100 pooled SQLite connections until the command ends, so 100 or more in one
#: command never complete and wedge the whole server.
FERRETDB_UPDATE_BATCH = 50
#: Prefix of the probe's scratch collections.
PROBE_PREFIX = "zarkov.probe."

#: How a server reads documents by ``_id`` from its ``_id`` index (see
#: :mod:`zarkov.storage.reads`): a range (MongoDB), ``$in`` lists
#: (mongo-java-server: only equality and ``$in`` on a unique index are served), or
#: one ``{_id: <ObjectId>}`` equality per query (FerretDB 1.24 pushes down nothing
#: else).
ID_RANGE = "range"
ID_IN = "in"
ID_ONE = "one"
_ID_READS = {"FerretDB": ID_ONE, "mongo-java-server": ID_IN}


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
    #: How documents are read by ``_id`` from the ``_id`` index (:data:`ID_RANGE`,
    #: :data:`ID_IN` or :data:`ID_ONE`).  By name.
    id_reads: str = ID_ONE
    #: Secondary indexes answer queries (``{_seq: null, aggregates: {$ne: …}}``, say);
    #: else every filter but ``_id`` reads the whole collection.  By name: MongoDB
    #: only (mongo-java-server uses unique indexes alone, FerretDB none).
    indexed_filters: bool = False
    #: Slices of a filter's matches in natural order (``skip`` + ``limit``, no sort)
    #: cost what they return, and a document keeps its place in that order while it
    #: lives (mongo-java-server: in memory, one slot per document, a freed slot
    #: reused by a later insert; with ``-data``, H2 keeps documents in ``_id`` order).
    #: By name: elsewhere ``skip`` reads what it skips (FerretDB) or natural order may
    #: move (MongoDB's storage engines).
    natural_slices: bool = False

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


# Keyed by the client's identity, not equality: two MongoClients of the same seeds are
# equal, and a weak dictionary keyed by equality drops the entry of the living one
# when an equal client it was first stored under is collected.
_cache: dict[int, tuple["weakref.ref[MongoClient]", dict[str, Capabilities]]] = {}
_lock = threading.Lock()


def _known(client: MongoClient) -> dict[str, Capabilities]:
    """The capabilities probed with ``client`` so far, by database (under ``_lock``)."""
    key = id(client)
    entry = _cache.get(key)
    if entry is None or entry[0]() is not client:
        def forget(_: object) -> None:
            _cache.pop(key, None)
        entry = (weakref.ref(client, forget), {})
        _cache[key] = entry
    return entry[1]


def capabilities(client: MongoClient, database: str) -> Capabilities:
    """What the server behind ``client`` can do in ``database`` (probed once, then kept)."""
    with _lock:
        known = _known(client)
        if database not in known:
            who = identify(client)
            renames_dotted, renames_over = _probe_renames(client[database])
            known[database] = Capabilities(**vars(who), renames_dotted=renames_dotted,
                                           renames_over=renames_over,
                                           bulk_updates=who.server != "FerretDB",
                                           atomic_updates=who.server != "FerretDB",
                                           id_reads=_ID_READS.get(who.server, ID_RANGE),
                                           indexed_filters=who.server not in _ID_READS,
                                           natural_slices=who.server == "mongo-java-server")
            log.debug("%s, database %s: %s", known[database].label, database, known[database])
        return known[database]
