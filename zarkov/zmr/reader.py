"""The query phase: read input collections as raw BSON and cut it into chunks.

The router never decodes input documents.  :func:`raw_arrays` runs the ``find`` and
``getMore`` commands itself and hands over each batch of the server's reply as the
raw BSON array it is (pymongo's ``find_raw_batches`` wraps every document of a batch
in a ``RawBSONDocument`` on the way, which cost the router more than the rest of its
work per document); :func:`cut_chunks` walks the arrays' elements and cuts their
documents into chunks of at most ``chunk_size`` bytes (a document larger than that
travels alone).  One chunk is one ZeroMQ message.
"""
from __future__ import annotations

import struct
from typing import Any, Iterable, Iterator, Mapping, Sequence

import bson
from bson import SON
from bson.codec_options import CodecOptions
from bson.int64 import Int64
from bson.raw_bson import RawBSONDocument
from pymongo.errors import ConfigurationError, PyMongoError

_LEN = struct.Struct("<i")
_RAW = CodecOptions(document_class=RawBSONDocument)

# Documents per server batch: large enough to amortise round trips, small enough
# that the first chunk goes out to workers early.
BATCH_SIZE = 2000

# Size of the value of each BSON element type, when fixed (else computed below).
_FIXED = {0x01: 8, 0x06: 0, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8,
          0x12: 8, 0x13: 16, 0x7F: 0, 0xFF: 0}
_PREFIXED = {0x02, 0x0D, 0x0E}   # int32 length + bytes
_WHOLE = {0x03, 0x04, 0x0F}      # int32 length counts itself


class ReaderError(Exception):
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


def _find(db, name: str, query: Mapping[str, Any], batch_size: int):
    """Run ``find``; return (its reply, the session its cursor belongs to or None).

    MongoDB ties a cursor to the session of its ``find``, so every ``getMore`` must
    come in the same session: an explicit one, where the server has sessions.
    """
    command = SON([("find", name), ("filter", dict(query)), ("batchSize", batch_size)])
    session = db.client.start_session(causal_consistency=False)
    try:
        return db.command(command, codec_options=_RAW, session=session), session
    except ConfigurationError:  # a server without sessions (mongo-java-server)
        session.end_session()
        return db.command(command, codec_options=_RAW), None
    except BaseException:
        session.end_session()
        raise


def raw_arrays(db, names: Sequence[str], query: Mapping[str, Any],
               batch_size: int = BATCH_SIZE) -> Iterator[bytes]:
    """Every matching document of each named collection: the server's batches, each
    a raw BSON array of documents."""
    for name in names:
        reply, session = _find(db, name, query, batch_size)
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


# bson's own (C) version of _concatenated, which pymongo uses for its raw batches:
# the router's only per-document work then is to check chunk boundaries.
_concatenated = getattr(bson, "_array_of_documents_to_buffer", concatenated)


def cut_chunks(arrays: Iterable[bytes], chunk_size: int) -> Iterator[tuple[bytes, int]]:
    """Re-cut the documents of raw BSON arrays into (chunk, document count) of at most
    ``chunk_size`` bytes: the documents concatenated, as ``bson.decode_all`` reads."""
    parts: list[memoryview] = []
    size = count = 0
    unpack = _LEN.unpack_from
    for array in arrays:
        docs = _concatenated(array)
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
