"""Merging with the user's reduce, and applying the results to the targets
(docs/exactly-once.md, states ``staged`` and ``applying``).

Incremental run: the new value of a key is ``reduce(key, [old, staged])`` where the
target has the key, else the staged value.  These *after-images* are computed
without touching the target — kept in the run record when small (``after``), else
written into ``<staging>.after`` — then written over the target's documents:
applying the same after-images twice gives the same result.  Full run: the staging
collection becomes the target.  Both write through :mod:`zarkov.storage`, which
picks the way the server allows.
"""
from __future__ import annotations

import struct
import traceback
from typing import Iterable, Iterator, Optional

import bson
from bson.binary import Binary
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

from zarkov import functions, storage
from zarkov.aggregation.scope import Scope, StepFailed
from zarkov.bsonkeys import group_key

#: Documents merged per batch (one look-up of the old values per batch).
BATCH = 1000
#: After-images written per batch.  Where overwriting is delete + insert (FerretDB),
#: readers of the target miss at most this many documents at a time.
APPLY_BATCH = 100

RAW = CodecOptions(document_class=RawBSONDocument)
_LEN = struct.Struct("<i")


def after_name(out: dict) -> str:
    """The collection of an output's after-images."""
    return out["staging"] + ".after"


def _staged(scope: Scope, out: dict) -> Iterator[list[RawBSONDocument]]:
    """The staged documents of one output, in batches."""
    if "inline" in out:
        docs = bson.decode_all(bytes(out["inline"]), RAW)
        for i in range(0, len(docs), BATCH):
            yield docs[i:i + BATCH]
        return
    # Read in raw batches, written elsewhere: no cursor stays open on a collection
    # being written (FerretDB's multi-document writes would wait for it).
    for raw in storage.raw_batches(scope.db[out["staging"]], BATCH):
        yield [RawBSONDocument(r) for r in raw]


def after_images(scope: Scope, out: dict, inline_max: int = 0) -> Optional[Binary]:
    """Compute the after-images of one output (from scratch).

    Returned as concatenated BSON when they come to at most ``inline_max`` bytes
    (for the run record), else written into :func:`after_name` (None returned).
    """
    target_name = out["target"]
    scope.report(f"merging {target_name}", 0)
    reduce = functions.load(out["reduce_text"], out["reduce_name"], "reduce")
    target = scope.db[target_name]
    kept: list[bytes] = []
    size = 0
    after = None
    n = 0
    for docs in _staged(scope, out):
        old = {group_key(d["_id"]): d
               for d in target.find({"_id": {"$in": [d["_id"] for d in docs]}})}
        images: list[bytes] = []
        for d in docs:
            prev = old.get(group_key(d["_id"]))
            if prev is None:
                images.append(bytes(d.raw))
                continue
            values = [prev.get("value"), d.get("value")]
            try:
                if out["kind"] == "xmr":
                    value = reduce(out["c"], d["_id"], values)
                else:
                    value = reduce(d["_id"], values)
            except Exception as e:  # noqa: BLE001 - the user's reduce
                raise StepFailed(f"reduce '{out['reduce_name']}' raised {type(e).__name__}: "
                                 f"{e} while merging into {target_name}",
                                 traceback.format_exc()) from None
            images.append(bson.encode({**prev, "value": value}))
        n += len(images)
        if after is None:
            kept += images
            size += sum(map(len, images))
            if size <= inline_max:
                continue
            # Too large for the record: into a collection, with what was kept.
            after = scope.db[after_name(out)]
            after.drop()
            images, kept = kept, []
        after.insert_many([RawBSONDocument(i) for i in images], ordered=False)
        scope.report(f"merging {target_name}", n)
    if after is None:
        return Binary(b"".join(kept))
    return None


def apply(scope: Scope, out: dict, full: bool) -> None:
    """Write one output's results into its target (idempotent).

    Full: the staging collection replaces the target; a missing staging collection
    means it already did.  Incremental: the after-images overwrite the target's
    documents.  The hook is called after each batch written.
    """
    target = out["target"]
    scope.report(f"applying {target}", 0)
    written = [0]

    def on_batch(n: int) -> None:
        written[0] += n
        scope.report(f"applying {target}", written[0])
        scope.hook("applying")

    if full:
        if out["staging"] not in scope.db.list_collection_names():
            return
        scope.write_paths[target] = scope.writes.replace_from(out["staging"], target, on_batch)
    else:
        if "after" in out:
            docs = _split(bytes(out["after"]))
            after: Iterable[list[bytes]] = (docs[i:i + APPLY_BATCH]
                                            for i in range(0, len(docs), APPLY_BATCH))
        else:
            after = storage.raw_batches(scope.db[after_name(out)], APPLY_BATCH)
        scope.write_paths[target] = scope.writes.overwrite(target, after, on_batch)


def _split(data: bytes) -> list[bytes]:
    """Concatenated BSON documents, one by one."""
    docs, pos = [], 0
    while pos < len(data):
        (n,) = _LEN.unpack_from(data, pos)
        docs.append(data[pos:pos + n])
        pos += n
    return docs
