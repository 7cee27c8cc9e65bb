"""The query phase: read input collections as raw BSON and cut it into chunks.

The router never decodes input documents.  :func:`raw_arrays` reads them through
:mod:`zarkov.storage.reads` (raw ``find``/``getMore`` batches, or reads by position
where the server serves those better) as raw BSON arrays; :func:`cut_chunks` walks
the arrays' elements and cuts their documents into chunks of at most ``chunk_size``
bytes (a document larger than that travels alone).  One chunk is one ZeroMQ
message.
"""
from __future__ import annotations

import struct
from typing import Any, Iterable, Iterator, Mapping, Sequence

import bson

from zarkov import storage
from zarkov.storage.reads import BATCH_SIZE, ReaderError

_LEN = struct.Struct("<i")


def raw_arrays(db, names: Sequence[str], query: Mapping[str, Any],
               batch_size: int = BATCH_SIZE) -> Iterator[bytes]:
    """Every matching document of the named collections, as raw BSON arrays."""
    return storage.reads(db).arrays(names, query, batch_size)


def concatenated(array: bytes) -> bytes:
    """The documents of a raw BSON array, concatenated (their element headers out)."""
    out: list[memoryview] = []
    view = memoryview(array)
    find = array.index
    unpack = _LEN.unpack_from
    pos, end = 4, len(array) - 1
    while pos < end:
        if array[pos] != 0x03:
            raise ReaderError(f"an element of type {array[pos]:#x} in a batch of documents")
        pos = find(b"\x00", pos + 1) + 1  # past the element's key ("0", "1", ...)
        (n,) = unpack(array, pos)
        out.append(view[pos:pos + n])
        pos += n
    return b"".join(out)


#: :func:`concatenated` in C where bson has it (pymongo uses it for its raw batches):
#: the router's only per-document work then is to check chunk boundaries.
concatenated_fast = getattr(bson, "_array_of_documents_to_buffer", concatenated)


def cut_chunks(arrays: Iterable[bytes], chunk_size: int) -> Iterator[tuple[bytes, int]]:
    """Re-cut the documents of raw BSON arrays into (chunk, document count) of at most
    ``chunk_size`` bytes: the documents concatenated, as ``bson.decode_all`` reads."""
    parts: list[memoryview] = []
    size = count = 0
    unpack = _LEN.unpack_from
    for array in arrays:
        docs = concatenated_fast(array)
        view = memoryview(docs)
        pos = start = 0
        end = len(docs)
        while pos < end:
            (n,) = unpack(docs, pos)
            if size + n > chunk_size and size:
                parts.append(view[start:pos])
                yield b"".join(parts), count
                parts, size, count, start = [], 0, 0, pos
            size += n
            count += 1
            pos += n
        if start < end:
            parts.append(view[start:end])
    if size:
        yield b"".join(parts), count
