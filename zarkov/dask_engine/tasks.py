"""What Dask workers run for a job: read a piece of the input, map, reduce, basic.

Plain functions of plain arguments (bytes, lists, dicts), importable on any worker
that has Zarkov installed.  They reuse :mod:`zarkov.zmr.compute` (the router's
workers run the same code) and :mod:`zarkov.storage.reads` (the same reads, chosen
per server).  None of them writes to the database: a job's outputs are written by
the gateway once every task has succeeded (:mod:`zarkov.dask_engine.job`), so a task
that Dask runs again after losing a worker can never write twice.
"""
from __future__ import annotations

import itertools
import threading
from typing import Any, Mapping, Optional, Sequence

import pymongo

from zarkov import storage
from zarkov.storage.capabilities import ID_RANGE
from zarkov.storage.reads import documents, find_arrays, id_of
from zarkov.zmr import compute, reader

_clients: dict[str, pymongo.MongoClient] = {}
_lock = threading.Lock()

#: (kind, names, what): ``("range", names, clause)`` — a range of positions, read by
#: id where the server's ``_id`` index serves no range; ``("query", names, filter)``
#: — a filter whose cost is what it returns on this server (MongoDB ``_id``
#: ranges); ``("scan", names, filter)`` — one cursor over the filter, whose
#: documents are cut into chunks for the map tasks; ``("slice", [name], {filter,
#: skip, limit})`` — a natural-order slice of the filter's matches (mongo-java-server).
Piece = tuple


def mongo(uri: str) -> pymongo.MongoClient:
    """The worker process's client of ``uri`` (one per process, kept)."""
    with _lock:
        client = _clients.get(uri)
        if client is None:
            client = _clients[uri] = pymongo.MongoClient(uri)
        return client


def read_piece(uri: str, database: str, piece: Piece) -> bytes:
    """The documents of one ``range``, ``query`` or ``slice`` piece, concatenated BSON."""
    kind, names, what = piece
    if kind == "slice":
        return read_slice(uri, database, piece)[0]
    db = mongo(uri)[database]
    reads = storage.reads(db)
    if kind == "range" and reads.caps.id_reads != ID_RANGE:
        from zarkov import positions
        rng = positions.parse_clause(what)
        assert rng is not None, "a range piece holds a range clause"
        arrays = reads.by_id(names, rng.ids())
    else:
        arrays = find_arrays(db, names, what)
    return b"".join(reader.concatenated_fast(a) for a in arrays)


def read_slice(uri: str, database: str, piece: Piece) -> tuple[bytes, tuple[Any, Any]]:
    """The documents of a ``slice`` piece, and its edges for :func:`split.slices_agree`:
    (the ``_id`` of its first document, of the document one past its end), each None
    where there is none.  The one past the end is read in the same query and left out.
    """
    _, names, what = piece
    limit = what["limit"]
    arrays = find_arrays(mongo(uri)[database], names, what["filter"], skip=what["skip"],
                         limit=None if limit is None else limit + 1)
    data = b"".join(reader.concatenated_fast(a) for a in arrays)
    docs = documents(data)
    head = next(docs, None)
    first = None if head is None else id_of(head)
    past = None
    if head is not None and limit is not None:
        # At most limit + 1 come back: one past the end is the last of them.
        extra = next(itertools.islice(docs, limit - 1, None), None)
        if extra is not None:
            past = id_of(extra)
            data = data[:len(data) - len(extra)]
    return data, (first, past)


def scan_chunks(uri: str, database: str, piece: Piece, chunk_size: int,
                least: int) -> list[tuple[bytes, int]]:
    """One cursor over a ``scan`` piece, cut into (chunk, documents): one chunk when it
    holds at most ``chunk_size`` bytes (one task does it all, as the router does),
    else at least ``least`` chunks of equal size (one or two per worker thread:
    fewer, larger tasks than the router's, whose cost is per chunk)."""
    _, names, query = piece
    db = mongo(uri)[database]
    arrays = list(storage.reads(db).arrays(names, query))
    total = sum(map(len, arrays))
    pieces = 1 if total <= chunk_size else max(least, -(-total // chunk_size))
    return list(reader.cut_chunks(arrays, max(1, -(-total // pieces))))


def map_piece(fns: Mapping[str, Any], uri: str, database: str, piece: Piece,
              parts: int, xmr: bool) -> tuple[int, dict[int, bytes], Optional[tuple]]:
    """Read a piece and map + combine it: (documents read, {partition: records}, the
    edges of a slice or None)."""
    edges = None
    if piece[0] == "slice":
        data, edges = read_slice(uri, database, piece)
    else:
        data = read_piece(uri, database, piece)
    n, _, out = compute.run_map(compute.load_functions(fns), data, parts, xmr)
    return n, out, edges


def map_chunk(fns: Mapping[str, Any], chunk: tuple[bytes, int], parts: int,
              xmr: bool) -> tuple[int, dict[int, bytes]]:
    """Map + combine one chunk of a scan: (documents, {partition: records})."""
    n, _, out = compute.run_map(compute.load_functions(fns), chunk[0], parts, xmr)
    return n, out


def map_reduce_piece(fns: Mapping[str, Any], uri: str, database: str,
                     piece: Optional[Piece], chunk: Optional[tuple[bytes, int]], xmr: bool,
                     finalize: bool) -> tuple[int, dict[str, bytes]]:
    """A whole input that is one piece (or one chunk): map, reduce, finalize at once."""
    if chunk is not None:
        data = chunk[0]
    else:
        assert piece is not None, "a piece or a chunk"
        data = read_piece(uri, database, piece)
    return compute.run_map_reduce(compute.load_functions(fns), data, xmr, finalize)


def counts(chunks: list[tuple[bytes, int]]) -> list[int]:
    """The document count of each chunk of a scan."""
    return [n for _, n in chunks]


def item(value: Any, index: Any) -> Any:
    """``value[index]`` (a chunk of a scan, the count of a map result)."""
    return value[index]


def summary(result: tuple[int, dict[int, bytes], Optional[tuple]]) -> tuple[int, Optional[tuple]]:
    """(documents read, edges of a slice or None) of a :func:`map_piece` result."""
    return result[0], result[2]


def partition(result: tuple[int, dict[int, bytes]], p: int) -> bytes:
    """Partition ``p`` of a map result (empty when the map gave it no key)."""
    return result[1].get(p, b"")


def reduce_partition(fns: Mapping[str, Any], xmr: bool, finalize: bool,
                     *parts: bytes) -> dict[str, bytes]:
    """Reduce one partition from every map's share of it: {collection: documents}."""
    return compute.run_reduce(compute.load_functions(fns), b"".join(parts), xmr, finalize)


def rereduce(fns: Mapping[str, Any], new: bytes, old: bytes, collection: Optional[str]) -> bytes:
    """Reduce mode: fold the stored values in (see :func:`compute.run_rereduce`)."""
    return compute.run_rereduce(compute.load_functions(fns), new, old, collection)


def basic(fns: Mapping[str, Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """A basic job's one call."""
    return compute.run_basic(compute.load_functions(fns), list(args), dict(kwargs))
