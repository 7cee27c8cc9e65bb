"""What a worker process computes: map+combine, reduce+finalize, re-reduce, basic.

Pure functions of bytes in and bytes out, so that they can be tested without
sockets.  Records travel as concatenated BSON documents:

* map output / partition data: ``{k, v}`` (``{c, k, v}`` for xmapreduce);
* reduce output: ``{_id, value}`` documents (or what finalize yields), grouped by
  output collection (``""`` stands for the job's ``output_name``).

The shipped functions (README, "Using it"): ``map(objects)`` yields ``(key, value)``
pairs (xmapreduce: ``{c, k, v}`` documents or ``(c, k, v)`` tuples);
``reduce(key, values)`` (xmapreduce: ``reduce(c, key, values)``) must accept its
own output among the values; ``finalize(objects)`` (xmapreduce:
``finalize(c, objects)``) yields the documents to store.  As in MongoDB, a key
with a single value is not passed to reduce.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import bson

from zarkov import functions
from zarkov.bsonkeys import group_key, partition_of
from zarkov.wire import CODEC

_CACHE: dict[tuple[str, str, str], Callable[..., Any]] = {}
_CACHE_MAX = 64


def load_functions(fns: Mapping[str, Any]) -> dict[str, Callable[..., Any]]:
    """Load ``{"map": [text, name], ...}`` into callables, cached per process.

    Every chunk of a job names the same functions; compiling them once per
    process keeps the per-chunk cost to a dict look-up.
    """
    out = {}
    for what, (text, name) in fns.items():
        key = (what, name, text)
        func = _CACHE.get(key)
        if func is None:
            if len(_CACHE) >= _CACHE_MAX:
                _CACHE.clear()
            func = _CACHE[key] = functions.load(text, name, what)
        out[what] = func
    return out


def _xitem(item: Any) -> tuple[str, Any, Any]:
    """(c, k, v) of one xmapreduce map output: a ``{c, k, v}`` document or a triple."""
    if isinstance(item, Mapping):
        return item["c"], item["k"], item["v"]
    c, k, v = item
    return c, k, v


def _group(records: Iterable[Any], xmr: bool) -> dict:
    """Group (key, value) records by key: {group key: [collection, key, values]}."""
    groups: dict = {}
    get = groups.get
    if xmr:
        for item in records:
            c, k, v = _xitem(item)
            g = (c, group_key(k))
            entry = get(g)
            if entry is None:
                groups[g] = [c, k, [v]]
            else:
                entry[2].append(v)
    else:
        for k, v in records:
            key = group_key(k)
            entry = get(key)
            if entry is None:
                groups[key] = [None, k, [v]]
            else:
                entry[2].append(v)
    return groups


def _reduced(entry: list, reduce: Callable[..., Any], xmr: bool) -> Any:
    c, k, values = entry
    if len(values) == 1:
        return values[0]
    return reduce(c, k, values) if xmr else reduce(k, values)


def run_map(fns: Mapping[str, Callable[..., Any]], chunk: bytes, reduce_count: int,
            xmr: bool = False) -> tuple[int, int, dict[int, bytes]]:
    """Map and combine one chunk of input documents.

    Returns (documents read, records out, {partition: concatenated records}).
    """
    docs = bson.decode_all(chunk, CODEC)
    groups = _group(fns["map"](docs), xmr)
    reduce = fns["reduce"]
    parts: dict[int, list[bytes]] = {}
    encode = bson.encode
    for entry in groups.values():
        c, k, _ = entry
        v = _reduced(entry, reduce, xmr)
        if xmr:
            p = partition_of(k, reduce_count, c)
            rec = encode({"c": c, "k": k, "v": v})
        else:
            p = partition_of(k, reduce_count)
            rec = encode({"k": k, "v": v})
        parts.setdefault(p, []).append(rec)
    return len(docs), len(groups), {p: b"".join(recs) for p, recs in parts.items()}


def run_map_reduce(fns: Mapping[str, Callable[..., Any]], chunk: bytes, xmr: bool = False,
                   finalize: bool = True) -> tuple[int, dict[str, bytes]]:
    """Map, reduce (and finalize) a whole input that is one chunk, in one go.

    Returns (documents read, {collection: documents}) as :func:`run_reduce` does.
    """
    docs = bson.decode_all(chunk, CODEC)
    groups = _group(fns["map"](docs), xmr)
    return len(docs), _reduce_groups(fns, groups, xmr, finalize)


def _reduce_groups(fns: Mapping[str, Callable[..., Any]], groups: dict, xmr: bool,
                   finalize: bool) -> dict[str, bytes]:
    """Reduced (and finalized) ``{_id, value}`` documents of ``groups``, by collection."""
    by_coll: dict[str, list[dict]] = {}
    for entry in groups.values():
        by_coll.setdefault(entry[0] or "", []).append(
            {"_id": entry[1], "value": _reduced(entry, fns["reduce"], xmr)})
    out = {}
    for c, docs in by_coll.items():
        final = _finalized(fns, c if xmr else None, docs, xmr) if finalize else docs
        out[c] = b"".join(bson.encode(d) for d in final)
    return out


def _finalized(fns: Mapping[str, Callable[..., Any]], c: str | None,
               docs: list[dict], xmr: bool) -> Iterable[Any]:
    finalize = fns.get("finalize")
    if finalize is None:
        return docs
    return finalize(c, iter(docs)) if xmr else finalize(iter(docs))


def run_reduce(fns: Mapping[str, Callable[..., Any]], data: bytes, xmr: bool = False,
               finalize: bool = True) -> dict[str, bytes]:
    """Reduce one partition; finalize when asked.  Returns {collection: documents}."""
    groups = _group(((r["c"], r["k"], r["v"]) if xmr else (r["k"], r["v"])
                     for r in bson.decode_all(data, CODEC)), xmr)
    return _reduce_groups(fns, groups, xmr, finalize)


def run_rereduce(fns: Mapping[str, Callable[..., Any]], new: bytes, old: bytes,
                 collection: str | None = None, finalize: bool = True) -> bytes:
    """Fold this job's results into stored ones: value = reduce(key, [old, new]).

    ``new`` and ``old`` hold ``{_id, value}`` documents (``old``: those already in
    the output collection with the same ``_id``s).  ``collection`` is given for
    xmapreduce jobs, whose reduce takes it first.  Finalize runs after.
    """
    xmr = collection is not None
    stored = {group_key(d["_id"]): d.get("value") for d in bson.decode_all(old, CODEC)}
    reduce = fns["reduce"]
    docs = []
    for d in bson.decode_all(new, CODEC):
        k = d["_id"]
        g = group_key(k)
        if g in stored:
            values = [stored[g], d["value"]]
            d = {"_id": k, "value": reduce(collection, k, values) if xmr else reduce(k, values)}
        docs.append(d)
    final = _finalized(fns, collection, docs, xmr) if finalize else docs
    return b"".join(bson.encode(d) for d in final)


def run_basic(fns: Mapping[str, Callable[..., Any]], args: list, kwargs: dict) -> Any:
    """Call the job's one function; its return value must be BSON-encodable."""
    result = fns["func"](*args, **kwargs)
    bson.encode({"result": result})  # fail here, with a clear traceback, if not
    return result
