"""The JSON filters of ``/qr``: what a caller may ask of MongoDB, and nothing more.

A filter is a JSON object whose keys are field paths or ``$and``/``$or``.  A field
maps to a literal (equality) or to a document of plain comparisons: ``$eq``,
``$ne``, ``$gt``, ``$gte``, ``$lt``, ``$lte`` and ``$in``.  Any other operator
(``$where``, ``$function``, ``$expr``, ``$accumulator``, ``$regex`` ...) is refused,
and so is a ``$`` key anywhere inside a literal, so the filter that reaches the
database is exactly one of these shapes.  ``{"$date": "2011-07-22"}`` (or
milliseconds) stands for a datetime wherever a literal may be.
"""
from __future__ import annotations

import datetime as dt
import math
from typing import Any

from zarkov.errors import BadInput
from zarkov.web.timekeys import parse_bound

COMPARISONS = frozenset(("$eq", "$ne", "$gt", "$gte", "$lt", "$lte"))
LOGICAL = frozenset(("$and", "$or"))
ALLOWED = "$eq, $ne, $gt, $gte, $lt, $lte, $in, $and, $or"
MAX_DEPTH = 10
MAX_ITEMS = 1000          # elements of a $in list or a literal list; clauses of $and/$or
MAX_PATH = 200
_EPOCH = dt.datetime(1970, 1, 1)


class FilterError(BadInput, ValueError):
    """A filter that is refused; the message says where and why."""


def check_path(path: Any, where: str) -> str:
    """A field path: non-empty segments, none starting with ``$``, no NUL."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH or "\x00" in path:
        raise FilterError(f"{where}: field name {path!r} is not a usable field path")
    for part in path.split("."):
        if not part or part.startswith("$"):
            raise FilterError(f"{where}: field name {path!r} is not a usable field path")
    return path


def _date(value: Any, where: str) -> dt.datetime:
    if isinstance(value, str):
        when = parse_bound(value)
        if when is not None:
            return when
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            return _EPOCH + dt.timedelta(milliseconds=value)
        except OverflowError:
            pass
    raise FilterError(f"{where}: $date needs an ISO date or milliseconds, got {value!r}")


def _literal(value: Any, where: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise FilterError(f"{where}: nested too deeply")
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FilterError(f"{where}: {value!r} is not a number MongoDB can compare")
        return value
    if isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise FilterError(f"{where}: more than {MAX_ITEMS} elements")
        return [_literal(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if set(value) == {"$date"}:
            return _date(value["$date"], where)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or k.startswith("$") or "\x00" in k:
                raise FilterError(f"{where}: key {k!r} is not allowed in a value "
                                  f"(operators allowed: {ALLOWED})")
            out[k] = _literal(v, f"{where}.{k}", depth + 1)
        return out
    raise FilterError(f"{where}: {type(value).__name__} is not a JSON value")


def _condition(value: Any, where: str, depth: int) -> Any:
    """What a field maps to: a literal, or a document of allowed operators."""
    if isinstance(value, dict) and any(isinstance(k, str) and k.startswith("$") for k in value):
        if set(value) == {"$date"}:
            return _literal(value, where, depth)
        if not value or not all(isinstance(k, str) and k.startswith("$") for k in value):
            raise FilterError(f"{where}: operators and field names cannot be mixed")
        out = {}
        for op, arg in value.items():
            if op in COMPARISONS:
                out[op] = _literal(arg, f"{where}.{op}", depth + 1)
            elif op == "$in":
                if not isinstance(arg, list):
                    raise FilterError(f"{where}.$in: needs a list")
                out[op] = _literal(arg, f"{where}.$in", depth + 1)
            else:
                raise FilterError(f"{where}: operator {op!r} is not allowed "
                                  f"(only {ALLOWED})")
        return out
    return _literal(value, where, depth)


def check_filter(obj: Any, where: str = "filter", depth: int = 0) -> dict:
    """The filter to send, built anew from ``obj``; FilterError when it is refused."""
    if depth > MAX_DEPTH:
        raise FilterError(f"{where}: nested too deeply")
    if not isinstance(obj, dict):
        raise FilterError(f"{where}: must be a JSON object, got {type(obj).__name__}")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key in LOGICAL:
            if not isinstance(value, list) or not value or len(value) > MAX_ITEMS:
                raise FilterError(f"{where}.{key}: needs a non-empty list of filters")
            out[key] = [check_filter(v, f"{where}.{key}[{i}]", depth + 1)
                        for i, v in enumerate(value)]
        elif isinstance(key, str) and key.startswith("$"):
            raise FilterError(f"{where}: operator {key!r} is not allowed (only {ALLOWED})")
        else:
            out[check_path(key, where)] = _condition(value, f"{where}.{key}", depth + 1)
    return out
