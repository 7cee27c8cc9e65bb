"""The read-only query API over ``zagg.*``: ``/q``, ``/qs``, ``/qr``, ``/collections``.

``/q?p=&c=&b=&e=`` (README, "The web service") reads ``<p><c>`` (``p`` defaults to ``zagg.``), the
keys from ``b`` to ``e`` inclusive, sorted by key, and returns
``{field: [[key, value], ...]}`` for each field of the stored ``value`` documents
(a value that is not a document is the field ``value``).  Keys that are times
(:mod:`zarkov.web.timekeys`) are given as milliseconds since the epoch.  ``b`` and ``e``
compare as strings with string keys; a collection whose keys are datetimes takes
them as ISO dates or date-times.  Beyond the original: either bound may be left out, and
``n`` keeps only the last ``n`` keys of the range.

Every parameter is checked before anything is sent to the database; a bad one
raises :class:`ApiError` naming it, which the app turns into a 400.
"""
from __future__ import annotations

import datetime as dt
import time
from typing import Any, Mapping, Optional

from pymongo import ASCENDING, DESCENDING
from pymongo.database import Database

from zarkov.errors import BadInput
from zarkov.eventlog.schema import Rejected, loads
from zarkov.web import filters
from zarkov.web.timekeys import key_millis, parse_bound

PREFIX = "zagg."
MAX_KEYS = 100000       # keys one /q may return
MAX_SERIES = 20         # queries in one /qs
MAX_LIMIT = 1000        # rows of /qr
MAX_TIME_MS = 20000     # time limit of each query on the database
MAX_NAME = 200
NAMES_TTL = 2.0         # seconds the list of collections is reused
KINDS_TTL = 60.0        # ... whether a collection's keys are datetimes
ABOUT_TTL = 15.0        # ... a collection's count, first and last key


class ApiError(BadInput):
    """A request the API refuses: ``parameter`` names the culprit."""

    def __init__(self, parameter: str, message: str, status: int = 400):
        super().__init__(message)
        self.parameter = parameter
        self.status = status

    def body(self) -> dict:
        """The JSON body of the error reply: ``{error, parameter}``."""
        text = str(self)
        if not text.startswith(self.parameter):
            text = f"{self.parameter}: {text}"
        return {"error": text, "parameter": self.parameter}


Params = Mapping[str, Any]


class QueryApi:
    """The query API over one database."""

    def __init__(self, db: Database):
        self.db = db
        self._names: tuple[float, list[str]] = (0.0, [])
        self._kinds: dict[str, tuple[float, bool]] = {}
        self._about: dict[str, tuple[float, dict]] = {}

    # -- parameters ----------------------------------------------------------------
    def collection_names(self) -> list[str]:
        """The ``zagg.*`` collections (cached for a moment: dashboards poll)."""
        at, names = self._names
        if time.monotonic() - at > NAMES_TTL:
            names = sorted(n for n in self.db.list_collection_names() if n.startswith(PREFIX))
            self._names = (time.monotonic(), names)
        return names

    def collection(self, params: Params, where: str = "") -> str:
        """The full name ``<p><c>`` of an existing ``zagg.*`` collection."""
        prefix = _text(params, "p", where, PREFIX)
        if not prefix.startswith(PREFIX):
            raise ApiError(f"{where}p", f"must start with '{PREFIX}': only aggregates "
                           f"can be read, got {prefix!r}")
        name = prefix + _text(params, "c", where)
        if len(name) > MAX_NAME or "$" in name or "\x00" in name or name.endswith("."):
            raise ApiError(f"{where}c", f"{name!r} is not a collection name")
        if name not in self.collection_names():
            self._names = (0.0, [])  # a collection created a moment ago
            if name not in self.collection_names():
                raise ApiError(f"{where}c", f"no collection {name!r}")
        return name

    # -- /q and /qs ----------------------------------------------------------------
    def series(self, params: Params) -> dict[str, list]:
        """The answer of ``/q`` for ``params``."""
        return self._read_series(*self._series_query(params))

    def _series_query(self, params: Params, where: str = "") -> tuple:
        """Check one series' parameters (``where`` prefixes their names in errors)."""
        name = self.collection(params, where)
        b = _text(params, "b", where, None)
        e = _text(params, "e", where, None)
        if b is not None and e is not None and _after(b, e):
            raise ApiError(f"{where}b", f"begin {b!r} is after end {e!r}")
        n = int_param(params, "n", where, None, 1, MAX_KEYS)
        return name, b, e, n, where

    def datetime_keys(self, name: str) -> bool:
        """Whether the keys of ``name`` are datetimes (judged by one document, kept a while).

        Why one look and not an ``$or`` over both kinds in every query: a filter on one
        range is what an index serves best, and what FerretDB scans fastest.
        """
        at, kind = self._kinds.get(name, (0.0, None))
        if kind is None or time.monotonic() - at > KINDS_TTL:
            doc = self.db[name].find_one({}, {"_id": 1})
            kind = doc is not None and isinstance(doc["_id"], dt.datetime)
            self._kinds[name] = (time.monotonic(), kind)
        return kind

    def _read_series(self, name: str, b: Optional[str], e: Optional[str], n: Optional[int],
                     where: str) -> dict[str, list]:
        flt = range_filter(b, e, self.datetime_keys(name), where)
        cursor = self.db[name].find(flt, {"value": 1}).max_time_ms(MAX_TIME_MS)
        if n is not None:
            docs = list(cursor.sort("_id", DESCENDING).limit(n))[::-1]
        else:
            docs = list(cursor.sort("_id", ASCENDING).limit(MAX_KEYS + 1))
            if len(docs) > MAX_KEYS:
                raise ApiError(f"{where}e", f"the range holds more than {MAX_KEYS} keys; "
                               "narrow it or use n")
        out: dict[str, list] = {}
        for doc in docs:
            key = doc.get("_id")
            ms = key_millis(key)
            key = ms if ms is not None else key
            value = doc.get("value")
            if isinstance(value, dict):
                for field, v in value.items():
                    out.setdefault(field, []).append([key, v])
            else:
                out.setdefault("value", []).append([key, value])
        return out

    def many(self, params: Params) -> list[dict[str, list]]:
        """The answer of ``/qs``: ``q`` is a JSON list of /q parameter objects."""
        specs = _json(params, "q")
        if not isinstance(specs, list) or not specs:
            raise ApiError("q", "must be a non-empty JSON list of objects "
                           "like {\"c\": ..., \"b\": ..., \"e\": ...}")
        if len(specs) > MAX_SERIES:
            raise ApiError("q", f"at most {MAX_SERIES} series per request, got {len(specs)}")
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict):
                raise ApiError(f"q[{i}]", "must be a JSON object")
            unknown = set(spec) - {"p", "c", "b", "e", "n"}
            if unknown:
                raise ApiError(f"q[{i}].{sorted(unknown)[0]}", "unknown parameter")
        # Every series is checked before the first is read.
        queries = [self._series_query(spec, f"q[{i}].") for i, spec in enumerate(specs)]
        return [self._read_series(*q) for q in queries]

    # -- /qr -----------------------------------------------------------------------
    def ranked(self, params: Params) -> dict[str, list]:
        """The answer of ``/qr``: top ``l`` documents matching ``f``, sorted by ``s``."""
        name = self.collection(params)
        flt: dict = {}
        if params.get("f") not in (None, ""):
            try:
                flt = filters.check_filter(_json(params, "f"), "f")
            except filters.FilterError as e:
                raise ApiError("f", str(e)) from None
        sort = parse_sort(_text(params, "s", "", "-value"))
        limit = int_param(params, "l", "", 10, 1, MAX_LIMIT)
        assert limit is not None  # it has a default
        rows = list(self.db[name].find(flt).sort(sort).limit(limit).max_time_ms(MAX_TIME_MS))
        return {"rows": rows}

    # -- /collections --------------------------------------------------------------
    def collections(self) -> list[dict]:
        """Every ``zagg.*`` collection: count, first and last key, whether keys are times.

        Each collection's figures are kept ``ABOUT_TTL`` seconds: dashboards poll, and
        on FerretDB a count or a sorted look-up reads the whole collection.
        """
        now = time.monotonic()
        out = []
        for name in self.collection_names():
            at, about = self._about.get(name, (0.0, None))
            if about is None or now - at > ABOUT_TTL:
                about = self._describe(name)
                self._about[name] = (now, about)
            out.append(about)
        return out

    def _describe(self, name: str) -> dict:
        coll = self.db[name]
        first = coll.find_one({}, {"_id": 1}, sort=[("_id", ASCENDING)])
        last = coll.find_one({}, {"_id": 1}, sort=[("_id", DESCENDING)])
        keys = [d["_id"] for d in (first, last) if d is not None]
        times = [key_millis(k) for k in keys]
        return {"name": name, "c": name[len(PREFIX):], "count": coll.estimated_document_count(),
                "keys": "time" if keys and None not in times else "other",
                "first": keys[0] if keys else None, "last": keys[-1] if keys else None,
                "first_ms": times[0] if keys else None, "last_ms": times[-1] if keys else None}


def range_filter(b: Optional[str], e: Optional[str], datetimes: bool = False,
                 where: str = "") -> dict:
    """The ``_id`` filter of an inclusive key range: strings as they are, or, for a
    collection whose keys are datetimes, the bounds read as ISO dates or times."""
    bounds: dict[str, Any] = {op: v for op, v in (("$gte", b), ("$lte", e)) if v is not None}
    if datetimes:
        for op, name in (("$gte", "b"), ("$lte", "e")):
            if op in bounds:
                when = parse_bound(bounds[op])
                if when is None:
                    raise ApiError(f"{where}{name}", f"the keys are datetimes: give an ISO date "
                                   f"or time such as 2011-07-22T10:05, got {bounds[op]!r}")
                bounds[op] = when
    return {"_id": bounds} if bounds else {}


def parse_sort(text: str) -> list[tuple[str, int]]:
    """``-value,_id`` → ``[("value", -1), ("_id", 1)]``; at most three fields."""
    out = []
    for part in text.split(","):
        part = part.strip()
        direction = DESCENDING if part.startswith("-") else ASCENDING
        field = part.lstrip("+-")
        try:
            filters.check_path(field, "s")
        except filters.FilterError:
            raise ApiError("s", f"{part!r} is not a field to sort by (e.g. -value)") from None
        out.append((field, direction))
    if len(out) > 3:
        raise ApiError("s", "at most three sort fields")
    return out


def _after(b: str, e: str) -> bool:
    tb, te = parse_bound(b), parse_bound(e)
    if tb is not None and te is not None:
        return tb > te
    return b > e


def _text(params: Params, name: str, where: str, default: Any = ...) -> Any:
    value = params.get(name)
    if value is None or value == "":
        if default is ...:
            raise ApiError(f"{where}{name}", "is required")
        return default
    if not isinstance(value, str):
        raise ApiError(f"{where}{name}", f"must be a string, got {type(value).__name__}")
    if len(value) > 1024 or "\x00" in value:
        raise ApiError(f"{where}{name}", "is not a usable string")
    return value


def int_param(params: Params, name: str, where: str, default: Optional[int], low: int,
              high: int) -> Optional[int]:
    """The integer parameter ``name`` (``low``..``high``), or ``default`` when absent."""
    value = params.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) < 12:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(f"{where}{name}", f"must be an integer from {low} to {high}, "
                       f"got {value!r}")
    return value


def _json(params: Params, name: str) -> Any:
    text = params.get(name)
    if not isinstance(text, str) or not text:
        raise ApiError(name, "is required (JSON)")
    try:
        return loads(text)
    except Rejected as e:
        why = str(e)
        if why.startswith("not JSON (") and why.endswith(")"):
            why = why[len("not JSON ("):-1]
        raise ApiError(name, f"malformed JSON ({why})") from None
