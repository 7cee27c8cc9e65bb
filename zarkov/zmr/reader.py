"""The query phase: read input collections as raw BSON and cut it into chunks.

The router never decodes input documents: pymongo's ``find_raw_batches`` hands
over the server's batches as bytes, and :func:`cut_chunks` only walks the 4-byte
length prefixes to cut them into chunks of at most ``chunk_size`` bytes (a
document larger than that travels alone).  One chunk is one ZeroMQ message.
"""
from __future__ import annotations

import struct
from typing import Any, Iterable, Iterator, Mapping, Sequence

_LEN = struct.Struct("<i")

# Documents per server batch: large enough to amortise round trips, small enough
# that the first chunk goes out to workers early.
BATCH_SIZE = 2000


def raw_batches(db, names: Sequence[str], query: Mapping[str, Any]) -> Iterator[bytes]:
    """Every matching document of each named collection, as raw BSON batches."""
    for name in names:
        yield from db[name].find_raw_batches(query, batch_size=BATCH_SIZE)


def cut_chunks(batches: Iterable[bytes], chunk_size: int) -> Iterator[tuple[bytes, int]]:
    """Re-cut raw BSON batches into (chunk, document count) of <= chunk_size bytes."""
    parts: list[memoryview] = []
    size = count = 0
    unpack = _LEN.unpack_from
    for batch in batches:
        view = memoryview(batch)
        end = len(batch)
        pos = start = 0
        while pos < end:
            (n,) = unpack(batch, pos)
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
