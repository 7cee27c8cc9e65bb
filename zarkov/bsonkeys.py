"""BSON keys: grouping within a process, and partitions that agree across processes.

A key may be any BSON value.  Two questions are asked of it:

* "Is this the same key as that one?" while combining values in one process —
  :func:`group_key` answers with a hashable stand-in that is cheap for the common
  scalar keys;
* "Which reduce partition does it belong to?" in every worker process alike —
  :func:`partition_of` hashes the key's BSON encoding.  Python's ``hash()`` of a
  ``str`` is salted per process, so it cannot be used for this.
"""
from __future__ import annotations

import datetime
import zlib
from typing import Any, Hashable, Mapping

import bson
from bson.objectid import ObjectId

# Types whose Python equality matches BSON equality once the type is part of the
# comparison (1 == 1.0 == True in Python, but they are distinct BSON values).
_SCALARS = (str, int, float, bool, datetime.datetime, ObjectId, bytes, type(None))


def group_key(key: Any) -> Hashable:
    """A hashable value equal for two keys exactly when their BSON values are equal."""
    cls = key.__class__
    if cls is str:
        return key  # the commonest case: no tuple to build
    if cls is datetime.datetime:
        # BSON keeps milliseconds: two datetimes that differ below that are one key.
        return (cls, key.replace(microsecond=key.microsecond // 1000 * 1000))
    if cls in _SCALARS:
        return (cls, key)
    if cls is dict or isinstance(key, Mapping):
        # A document (the commonest compound key, {"type": ..., "day": ...}): its
        # fields' own group keys in order (field order is part of a BSON document's
        # identity), a few times cheaper than encoding it.  The same for a dict and
        # a RawBSONDocument of the same document (merging compares the two); no
        # scalar's key starts with ``dict``.
        out: list = [dict]
        for field, value in key.items():
            out.append(field)
            out.append(value if value.__class__ is str else group_key(value))
        return tuple(out)
    # Arrays and rarer types: the encoding is the identity.
    return bson.encode({"k": key})


def partition_of(key: Any, count: int, collection: str | None = None) -> int:
    """The partition (0 <= p < count) of ``key``, the same in every process.

    ``collection`` is the output collection of an xmapreduce job: a key of one
    collection is unrelated to the same key of another.
    """
    doc = {"k": key} if collection is None else {"c": collection, "k": key}
    return zlib.crc32(bson.encode(doc)) % count
