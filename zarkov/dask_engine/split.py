"""Cutting a job's input into pieces that Dask workers read straight from the database.

What a piece may be depends on which reads cost what they return on the server
(:mod:`zarkov.storage.reads`, README "Servers"):

* **Ranges of positions** (a run's selection, ``{_id: {$gt, $lte}}`` per stream) are
  cut into sub-ranges of at most ``piece_ids`` positions, on every server: MongoDB
  reads each as an ``_id`` index range; mongo-java-server and FerretDB read each by
  id (``$in`` lists; one equality per id).  Where reading by id would cost more
  than one scan of the collection (the router's own test, :data:`ID_COST`), the
  ranges are read as one ``scan`` piece instead, as the router would.
* **Any other filter** (a Task's own filter, events marked ``{jobs: run_id}``, the
  flags of a full run, ``{}``): on MongoDB (an ``_id`` index that serves ranges) the
  filter is ANDed with ``_id`` ranges between boundaries taken from one pass over
  the matching ids (an index walk), one ``query`` piece per range; on the bundled
  servers, where every such filter reads the whole collection whatever it is ANDed
  with (FerretDB: all but ``_id`` equality; mongo-java-server: all but ``_id``
  equality and ``$in``), the filter is one ``scan`` piece: one cursor, its documents
  cut into chunks by the worker that reads it and mapped on every worker.  Splitting
  it into filtered ranges there would multiply the server's work by the number of
  pieces.  Except where natural-order slices cost what they return
  (mongo-java-server): a large input is cut into ``slice`` pieces by ``skip`` and
  ``limit``, each read and mapped by one task, and each slice reads one document
  past its end, which must be the next slice's first: a document deleted or inserted
  before a boundary between the reads shifts the slices, and the job is then read
  again as one scan (:func:`slices_agree`).

No ``$bucketAuto``, ``splitVector`` or ``$sample``: FerretDB has none of them.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from pymongo.database import Database

from zarkov.positions import Range
from zarkov.storage.capabilities import ID_RANGE, Capabilities
from zarkov.storage.reads import Reads
from zarkov.storage.reads import split as split_selection

#: Fewest positions in a range piece: below that a task's overhead dominates.
MIN_PIECE = 1000
#: Most positions in a range piece (a piece is held in a worker's memory).
MAX_PIECE = 50_000
#: Documents between two ``_id`` boundaries of a filter's pieces (MongoDB).
BOUNDARY_EVERY = 20_000
#: Fewest matching documents cut into natural-order slices (mongo-java-server): below
#: that one scan piece costs less than counting them and a task per slice.
SLICE_MIN = 10_000


def piece_size(total: int, threads: int) -> int:
    """Positions per range piece: about two pieces per worker thread, within bounds."""
    return max(MIN_PIECE, min(MAX_PIECE, -(-total // max(1, 2 * threads))))


def sub_ranges(rng: Range, size: int) -> list[Range]:
    """``rng`` cut into consecutive ranges of at most ``size`` positions."""
    return [Range(rng.stream, lo, min(rng.upto, lo + size))
            for lo in range(rng.after, rng.upto, size)]


def pieces(db: Database, caps: Capabilities, names: Sequence[str], query: Mapping[str, Any],
           threads: int, boundary_every: int = BOUNDARY_EVERY,
           slice_min: int = SLICE_MIN) -> list[tuple]:
    """The pieces of a job's input (see the module docstring and :data:`tasks.Piece`)."""
    names = list(names)
    plan = split_selection(query)
    if plan is not None and plan[2] is None:
        ranges, others, _ = plan
        reads = Reads(db, caps)
        if caps.id_reads == ID_RANGE or reads.by_id_pays(names, ranges):
            size = piece_size(sum(len(r) for r in ranges), threads)
            out = [("range", names, sub.clause()) for r in ranges for sub in sub_ranges(r, size)]
            if others is not None:
                out += filter_pieces(db, caps, names, others, boundary_every, threads,
                                     slice_min)
            return out
    return filter_pieces(db, caps, names, dict(query), boundary_every, threads, slice_min)


def filter_pieces(db: Database, caps: Capabilities, names: Sequence[str],
                  query: dict, boundary_every: int = BOUNDARY_EVERY, threads: int = 1,
                  slice_min: int = SLICE_MIN) -> list[tuple]:
    """Pieces of a filter that is not ranges of positions (see the module docstring)."""
    if caps.id_reads != ID_RANGE:
        if caps.natural_slices and threads > 1:
            return [p for name in names for p in slices(db, name, query, threads, slice_min)]
        return [("scan", list(names), query)]
    out: list[tuple] = []
    for name in names:
        bounds = id_boundaries(db, name, query, boundary_every)
        if bounds is None:  # ids of several BSON types: ranges would miss some
            out.append(("scan", [name], query))
            continue
        edges = [None, *bounds, None]
        for lo, hi in zip(edges, edges[1:]):
            rng: dict = {}
            if lo is not None:
                rng["$gte"] = lo
            if hi is not None:
                rng["$lt"] = hi
            clause = {"_id": rng} if rng else {}
            both = {"$and": [query, clause]} if query and clause else (query or clause)
            out.append(("query", [name], both))
    return out


def slices(db: Database, name: str, query: dict, threads: int,
           least: int = SLICE_MIN) -> list[tuple]:
    """``query``'s matches in collection ``name`` as natural-order slices, or one scan.

    Two slices per worker thread (while one worker reads, another maps), and slices
    of at most :data:`MAX_PIECE` documents for ``{}`` (whose skip costs the server
    nothing; a filter's skip matches what it skips, so more slices would cost more
    server time).  Documents added after the count are read by the last slice, which
    has no limit.
    """
    count = db[name].estimated_document_count() if not query else db[name].count_documents(query)
    if count < max(least, 2):
        return [("scan", [name], query)]
    k = max(2 * threads, 1 if query else -(-count // MAX_PIECE))
    size = -(-count // k)
    return [("slice", [name], {"filter": query, "skip": skip,
                               "limit": size if skip + size < count else None})
            for skip in range(0, count, size)]


def slices_agree(pieces: Sequence[tuple], edges: Sequence[Any]) -> bool:
    """Whether the slices of one read cover their collection once each: ``edges``
    holds, for each piece, the (first ``_id``, ``_id`` one past its end) its read
    saw (None for pieces that are not slices).  A slice's one-past-the-end must be
    the next slice's first (both None where the matches ran out early); else a
    document deleted or inserted before a boundary between the two reads shifted
    them, and a document may have been read twice or not at all.
    """
    previous = None
    for piece, edge in zip(pieces, edges):
        if piece[0] != "slice":
            continue
        if piece[2]["skip"] and (previous is None or previous[1] != edge[0]):
            return False
        previous = edge
    return True


def id_boundaries(db: Database, name: str, query: dict, every: int) -> "list | None":
    """Every ``every``-th ``_id`` of the matching documents in ``_id`` order, or None
    when the ids are of several BSON types (a range compares within one type only).

    One pass over ids only (a walk of the ``_id`` index on MongoDB).
    """
    bounds, first_type, n = [], None, 0
    for doc in db[name].find(query, {"_id": 1}).sort("_id", 1):
        oid = doc["_id"]
        kind = _bson_kind(oid)
        if first_type is None:
            first_type = kind
        elif kind != first_type:
            return None
        n += 1
        if n % every == 0:
            bounds.append(oid)
    return bounds


def _bson_kind(value: Any) -> str:
    # Numbers compare with each other across int/long/double: one kind.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return type(value).__name__
