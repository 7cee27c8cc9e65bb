"""How Zarkov reads documents from each server, as raw BSON arrays.

:func:`find_arrays` runs ``find`` and ``getMore`` itself and hands over each batch of
the server's reply as the raw BSON array it is: nothing is decoded (pymongo's
``find_raw_batches`` wraps every document in a ``RawBSONDocument`` on the way,
which cost the map-reduce router more than the rest of its work per document).
MongoDB ties a cursor to the session of its ``find``; mongo-java-server has no
sessions.

:meth:`Reads.arrays` is what the router's jobs read with.  A run's selection names
ranges of positions (``{_id: {$gt: …, $lte: …}}`` per stream,
:mod:`zarkov.positions`), alone or among other clauses of an ``$or``, possibly
ANDed with the Task's own filter.  How such a range costs what it holds depends on
the server's ``_id`` index (:attr:`Capabilities.id_reads`):

* MongoDB: the filter as it is; each range is an index scan;
* mongo-java-server: the newest documents first, read in reverse natural order
  (where a run that keeps up finds its range, :meth:`Reads.prefetch_tail`), then the
  range's ids not found there in ``$in`` lists of :data:`IN_BATCH` (its ``_id``
  index serves equality and ``$in``, not ranges; a long list costs more per id than
  several short ones);
* FerretDB 1.24: one ``{_id: <ObjectId>}`` query per id, :data:`CONCURRENCY` at a
  time (the only filter it does not answer by reading the whole collection);

— when the ids cost less than reading the whole collection would (:data:`ID_COST`
documents scanned per id, against :func:`approx_count`); otherwise, and when the
Task has a filter of its own (checking it needs the server), the filter as it is.
An id not found in the first collection is looked for in the next ones (older
events are in the rotated collections, ``event.0`` …).  The selection's other
clauses (events without a position, by their marks) are read with a filter of
their own.  Events read by id are kept in a small cache of the process
(:data:`CACHE_BYTES`): the AggDefs over one stream read the same new events one
after the other.  An event with a position never changes once stored (nothing
writes to it), so what the cache holds is what the database holds.
"""
from __future__ import annotations

import collections
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

from bson import SON
from bson.codec_options import CodecOptions
from bson.int64 import Int64
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument
from pymongo.database import Database
from pymongo.errors import ConfigurationError, PyMongoError

from zarkov import positions
from zarkov.errors import ZarkovError
from zarkov.storage.capabilities import ID_IN, ID_ONE, ID_RANGE, Capabilities, capabilities

_LEN = struct.Struct("<i")
_RAW = CodecOptions(document_class=RawBSONDocument)

# Documents per server batch: large enough to amortise round trips, small enough
# that the first chunk goes out to workers early.
BATCH_SIZE = 2000
#: Ids per batch read (and per raw array handed over).
ID_BATCH = 1000
#: Ids per ``$in`` query (measured on mongo-java-server 1.47: 1,000 ids cost 50 ms in
#: one query, 10 ms in lists of 50-100).
IN_BATCH = 64
#: Bytes of events read by id kept for the next reads of the same positions.
CACHE_BYTES = 32 << 20
#: Most ids of a read looked for first among the newest documents
#: (:meth:`Reads.prefetch_tail`); documents per server batch of that read; documents
#: read beyond the ids' count (other streams' events stored among them).
TAIL_MOST = 10_000
TAIL_BATCH = 256
TAIL_SLACK = 256
#: Queries of one id in flight at once (FerretDB).
CONCURRENCY = 8
#: About how many documents a scan reads in the time one id is read by id (measured
#: here: FerretDB ~0.4 ms a query against ~40 us a document scanned; the java
#: server ~10 us an id in short ``$in`` lists against ~0.5 us a document scanned).
ID_COST = {ID_IN: 20, ID_ONE: 10}
#: So few ids that reading them by id always pays: the collection is not counted.
FEW_IDS = 100
#: Seconds a collection's approximate count is reused once it is at least
#: :data:`COUNT_KEPT` (FerretDB's ``collStats`` costs ~65 ms at 100,000 documents, and
#: the choice needs only its order of size); a smaller count is cheap to take and
#: may soon be far too small (a collection filling up), so it is taken every time.
COUNT_TTL = 30.0
COUNT_KEPT = 10_000

# Size of the value of each BSON element type, when fixed (else computed below).
_FIXED = {0x01: 8, 0x06: 0, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8,
          0x12: 8, 0x13: 16, 0x7F: 0, 0xFF: 0}
_PREFIXED = {0x02, 0x0D, 0x0E}   # int32 length + bytes
_WHOLE = {0x03, 0x04, 0x0F}      # int32 length counts itself


class ReaderError(ZarkovError):
    """A server reply that is not what a ``find`` cursor answers."""


def _elements(doc: bytes) -> Iterator[tuple[int, str, int, int]]:
    """(type, key, value start, value end) of each top-level element of ``doc``."""
    pos, end = 4, len(doc) - 1
    while pos < end:
        kind = doc[pos]
        key_end = doc.index(b"\x00", pos + 1)
        key = doc[pos + 1:key_end].decode()
        start = key_end + 1
        if kind in _FIXED:
            stop = start + _FIXED[kind]
        elif kind in _PREFIXED:
            stop = start + 4 + _LEN.unpack_from(doc, start)[0]
        elif kind in _WHOLE:
            stop = start + _LEN.unpack_from(doc, start)[0]
        elif kind == 0x05:
            stop = start + 5 + _LEN.unpack_from(doc, start)[0]
        elif kind == 0x0B:
            stop = doc.index(b"\x00", doc.index(b"\x00", start) + 1) + 1
        elif kind == 0x0C:
            stop = start + 4 + _LEN.unpack_from(doc, start)[0] + 12
        else:
            raise ReaderError(f"unknown BSON element type {kind:#x} in a cursor reply")
        yield kind, key, start, stop
        pos = stop


def _cursor(reply: RawBSONDocument) -> tuple[int, bytes]:
    """(cursor id, raw array of the batch) of a find or getMore reply."""
    cursor = reply.get("cursor")
    if not isinstance(cursor, RawBSONDocument):
        raise ReaderError(f"a find reply without a cursor: {dict(reply)!r:.200}")
    raw = bytes(cursor.raw)
    cursor_id, batch = 0, b""
    for kind, key, start, stop in _elements(raw):
        if key == "id" and kind in (0x10, 0x12):
            cursor_id = struct.unpack_from("<q" if kind == 0x12 else "<i", raw, start)[0]
        elif key in ("firstBatch", "nextBatch") and kind == 0x04:
            batch = raw[start:stop]
    return cursor_id, batch


def _find(db, name: str, query: Mapping[str, Any], batch_size: int, skip: int = 0,
          limit: Optional[int] = None):
    """Run ``find``; return (its reply, the session its cursor belongs to or None).

    MongoDB ties a cursor to the session of its ``find``, so every ``getMore`` must
    come in the same session: an explicit one, where the server has sessions.
    """
    command = SON([("find", name), ("filter", dict(query)), ("batchSize", batch_size)])
    if skip:
        command["skip"] = skip
    if limit is not None:
        command["limit"] = limit
    session = db.client.start_session(causal_consistency=False)
    try:
        return db.command(command, codec_options=_RAW, session=session), session
    except ConfigurationError:  # a server without sessions (mongo-java-server)
        session.end_session()
        return db.command(command, codec_options=_RAW), None
    except BaseException:
        session.end_session()
        raise


def find_arrays(db, names: Sequence[str], query: Mapping[str, Any],
                batch_size: int = BATCH_SIZE, skip: int = 0,
                limit: Optional[int] = None) -> Iterator[bytes]:
    """Every matching document of each named collection (past the first ``skip``, at
    most ``limit``, in natural order): the server's batches, each a raw BSON array of
    documents."""
    for name in names:
        reply, session = _find(db, name, query, batch_size, skip, limit)
        cursor_id = 0
        try:
            cursor_id, batch = _cursor(reply)
            yield batch
            while cursor_id:
                reply = db.command(SON([("getMore", Int64(cursor_id)), ("collection", name),
                                        ("batchSize", batch_size)]),
                                   codec_options=_RAW, session=session)
                cursor_id, batch = _cursor(reply)
                yield batch
        finally:
            if cursor_id:  # the job stopped reading early: let the server forget it
                try:
                    db.command({"killCursors": name, "cursors": [Int64(cursor_id)]},
                               session=session)
                except PyMongoError:
                    pass
            if session is not None:
                session.end_session()


def reads(db: Database) -> "Reads":
    """How to read from ``db`` (its server probed once)."""
    return Reads(db, capabilities(db.client, db.name))


def approx_count(db: Database, name: str, caps: Optional[Capabilities] = None) -> int:
    """About how many documents collection ``name`` holds, without reading them.

    FerretDB answers ``count`` by reading the collection; its ``collStats`` count
    is an estimate from SQLite.  Others: the estimated document count (metadata).
    """
    caps = caps or capabilities(db.client, db.name)
    try:
        if caps.server == "FerretDB":
            return int(db.command("collStats", name).get("count", 0))
        return int(db[name].estimated_document_count())
    except PyMongoError:  # no such collection, say
        return 0


def documents(data: bytes) -> Iterator[bytes]:
    """The documents of concatenated BSON (a raw batch)."""
    at = 0
    while at + 4 <= len(data):
        size = _LEN.unpack_from(data, at)[0]
        yield data[at:at + size]
        at += size


_OID_FIRST = b"\x07_id\x00"


def id_of(raw: bytes) -> Any:
    """The ``_id`` of a raw document; without decoding the rest when it comes first
    and is an ObjectId (as the event logger stores every event)."""
    if raw[4:9] == _OID_FIRST:
        return ObjectId(raw[9:21])
    return RawBSONDocument(raw)["_id"]


def _array(docs: Sequence[bytes]) -> bytes:
    """Raw documents as a BSON array (what a server batch is)."""
    parts = [b"\x03" + str(i).encode() + b"\x00" + d for i, d in enumerate(docs)]
    body = b"".join(parts)
    return _LEN.pack(len(body) + 5) + body + b"\x00"


def split(query: Mapping[str, Any]) -> Optional[tuple[list, Optional[dict], Optional[dict]]]:
    """``(ranges, others, user)`` of a run's filter, or None when it names no range.

    A run's filter is its selection (one clause, or ``{$or: [clause, …]}``), or
    ``{$and: [selection, user's filter]}`` (:meth:`zarkov.task.Task._query`).
    ``ranges`` are the :class:`~zarkov.positions.Range` clauses, ``others`` the
    other clauses as one filter (or None), ``user`` the Task's own filter (or None).
    """
    user = None
    selection: Any = query
    if list(query) == ["$and"] and isinstance(query["$and"], list) and len(query["$and"]) == 2:
        selection, user = query["$and"]
    if not isinstance(selection, dict):
        return None
    clauses = selection["$or"] if list(selection) == ["$or"] else [selection]
    if not isinstance(clauses, list):
        return None
    ranges: list[positions.Range] = []
    others: list[Any] = []
    for clause in clauses:
        r = positions.parse_clause(clause)
        if r is not None:
            ranges.append(r)
        else:
            others.append(clause)
    if not ranges:
        return None
    rest = None if not others else others[0] if len(others) == 1 else {"$or": others}
    return ranges, rest, user


class Reads:
    """The ways of reading one database (see the module docstring)."""

    def __init__(self, db: Database, caps: Capabilities):
        self.db = db
        self.caps = caps

    def arrays(self, names: Sequence[str], query: Mapping[str, Any],
               batch_size: int = BATCH_SIZE) -> Iterator[bytes]:
        """Every document of the named collections that matches ``query``, as raw
        BSON arrays, read the cheapest way the server allows."""
        plan = None if self.caps.id_reads == ID_RANGE else split(query)
        if plan is None or plan[2] is not None or not self.by_id_pays(names, plan[0]):
            yield from find_arrays(self.db, names, query, batch_size)
            return
        ranges, others, _ = plan
        ids: Iterable[Any] = (oid for r in ranges for oid in r.ids())
        if self.caps.natural_slices and sum(len(r) for r in ranges) <= TAIL_MOST:
            ids = list(ids)
            self.prefetch_tail(names[0], ids)
        yield from self.by_id(names, ids)
        if others is not None:
            yield from find_arrays(self.db, names, others, batch_size)

    def by_id_pays(self, names: Sequence[str], ranges: list) -> bool:
        ids = sum(len(r) for r in ranges)
        if ids <= FEW_IDS:
            return True
        now = time.monotonic()
        total = 0
        for name in names:
            key = (id(self.db.client), self.db.name, name)
            at, count = _counts.get(key, (-COUNT_TTL, 0))
            if now - at >= COUNT_TTL or count < COUNT_KEPT:
                count = approx_count(self.db, name, self.caps)
                _counts[key] = (now, count)
            total += count
        return ids * ID_COST[self.caps.id_reads] < total

    def prefetch_tail(self, name: str, ids: list) -> None:
        """Put in the cache those of ``ids`` found among the newest documents of
        collection ``name``, read in reverse natural order (mongo-java-server).

        Why: a run that keeps up takes the events stored last, which are the last in
        natural order there; reading them so costs a third of naming them in ``$in``
        lists (5 ms against 11-19 ms for the newest 1,000 of 101,000).  Read at most
        as many as are wanted and not cached (plus :data:`TAIL_SLACK` for events of
        other streams stored among them); stop at the first server batch holding none
        of them (the range is older: the ``$in`` lists take it).  Whatever is not
        found here is fetched by id as before.
        """
        where = (id(self.db.client), self.db.name)
        with _fetching.setdefault(where, threading.Lock()):
            wanted = set(ids).difference(_RECENT.get(where, ids))
            if not wanted:
                return
            coll = self.db.get_collection(name, codec_options=_RAW)
            found: dict = {}
            cursor = coll.find_raw_batches({}, sort=[("$natural", -1)],
                                           limit=len(wanted) + TAIL_SLACK,
                                           batch_size=TAIL_BATCH)
            try:
                for batch in cursor:
                    before = len(found)
                    for raw in documents(batch):
                        oid = id_of(raw)
                        if oid in wanted:
                            found[oid] = raw
                    if len(found) == before or len(found) == len(wanted):
                        break
            finally:
                cursor.close()
            _RECENT.put(where, found)

    def by_id(self, names: Sequence[str], ids: Iterable[Any]) -> Iterator[bytes]:
        """The documents with these ids (in their order), looked for in each named
        collection in turn, as raw BSON arrays of at most :data:`ID_BATCH`."""
        batch: list = []
        for oid in ids:
            batch.append(oid)
            if len(batch) >= ID_BATCH:
                yield from self._batch(names, batch)
                batch = []
        if batch:
            yield from self._batch(names, batch)

    def _batch(self, names: Sequence[str], ids: list) -> Iterator[bytes]:
        where = (id(self.db.client), self.db.name)
        # One batch of a database read by id at a time: the AggDefs over one stream
        # read the same new events at the same moment, and the second finds in the
        # cache what the first fetched instead of fetching it again.
        with _fetching.setdefault(where, threading.Lock()):
            found = _RECENT.get(where, ids)
            missing = [i for i in ids if i not in found]
            for name in names:
                if not missing:
                    break
                got = self._fetch(name, missing)
                _RECENT.put(where, got)
                found.update(got)
                missing = [i for i in missing if i not in got]
        docs = [found[i] for i in ids if i in found]
        if docs:
            yield _array(docs)

    def _fetch(self, name: str, ids: list) -> dict:
        """``{_id: raw document}`` of those of ``ids`` that collection ``name`` holds,
        :data:`CONCURRENCY` queries in flight (the server works on several at once)."""
        coll = self.db.get_collection(name, codec_options=_RAW)
        if self.caps.id_reads == ID_IN:
            def query(part: list) -> list[bytes]:
                return [doc for batch in coll.find_raw_batches({"_id": {"$in": part}})
                        for doc in documents(batch)]
            parts = [ids[i:i + IN_BATCH] for i in range(0, len(ids), IN_BATCH)]
        else:
            def query(part: list) -> list[bytes]:
                d = coll.find_one({"_id": part[0]})
                return [] if d is None else [d.raw]
            parts = [[i] for i in ids]
        if len(parts) == 1:
            return {id_of(raw): raw for raw in query(parts[0])}
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            return {id_of(raw): raw for docs in pool.map(query, parts) for raw in docs}


class _Cache:
    """Raw events by (client, database) and ``_id``; the least recently used go past
    ``budget`` bytes."""

    def __init__(self, budget: int):
        self.budget = budget
        self.size = 0
        self._docs: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, where: tuple, ids: list) -> dict:
        """``{_id: raw}`` of those of ``ids`` held."""
        out = {}
        with self._lock:
            for i in ids:
                raw = self._docs.get((where, i))
                if raw is not None:
                    self._docs.move_to_end((where, i))
                    out[i] = raw
        return out

    def put(self, where: tuple, docs: dict) -> None:
        """Keep ``docs`` (``{_id: raw}``), dropping the oldest past the budget."""
        with self._lock:
            for i, raw in docs.items():
                key = (where, i)
                if key not in self._docs:
                    self._docs[key] = raw
                    self.size += len(raw)
            while self.size > self.budget and self._docs:
                self.size -= len(self._docs.popitem(last=False)[1])


_RECENT = _Cache(CACHE_BYTES)
#: (client, database) -> the lock of its reads by id.
_fetching: dict = {}
#: (client, database, collection) -> (when, approximate count).
_counts: dict = {}
