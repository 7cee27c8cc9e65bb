"""JSON for what MongoDB stores: datetimes, ObjectIds, binary, decimals, NaN.

Datetimes become ISO 8601 strings in UTC (``2011-07-22T10:05:00Z``), ObjectIds and
decimals strings, binary base64, NaN and infinities null; anything else BSON can
hold is written as its ``str``.  Key timestamps for charts are handled by
:func:`zarkov.web.timekeys.key_millis`, not here.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import math
from typing import Any

from bson import ObjectId
from bson.decimal128 import Decimal128


def iso(value: dt.datetime) -> str:
    """A datetime as ISO 8601 in UTC with milliseconds and a ``Z``."""
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value.isoformat(timespec="milliseconds") + "Z"


def _default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return iso(value)
    if isinstance(value, (ObjectId, Decimal128)):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def plain(value: Any) -> Any:
    """``value`` with every non-JSON type replaced as described above (NaN too)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float)):
        return value
    return _default(value)


def dumps(value: Any) -> str:
    """Compact JSON text of ``value`` (fast path; falls back to :func:`plain` for NaN)."""
    try:
        return json.dumps(value, default=_default, allow_nan=False, separators=(",", ":"))
    except ValueError:  # a NaN or an infinity somewhere
        return json.dumps(plain(value), separators=(",", ":"))
