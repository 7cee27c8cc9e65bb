"""Job requests: required fields, defaults and types (README, "The map-reduce protocol").

:func:`parse` turns a ``mapreduce`` / ``xmapreduce`` / ``basic`` request into a
:class:`JobSpec` or raises :class:`BadRequest`, whose message the router sends
back in the reply's ``error`` field.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import bson

from zarkov.errors import BadInput
from zarkov.oneline import short_repr
from zarkov.wire import CODEC, is_int

OUTPUT_TYPES = ("replace", "merge", "reduce")
JOB_COMMANDS = ("mapreduce", "xmapreduce", "basic")
#: Most bytes of output a job may hand back in its status instead of writing it
#: (``inline_max``): what the router keeps in memory per finished job.
INLINE_LIMIT = 1 << 20
#: Most seconds a ``status`` request may wait for its job to end (``wait``).
STATUS_WAIT_LIMIT = 60.0
_DB_NAME = re.compile(r"^[A-Za-z0-9_-]{1,63}$")


class BadRequest(BadInput):
    """A request the router cannot act on; the message says which field and why."""


@dataclasses.dataclass
class JobSpec:
    """What a job does, after defaults: the router's view of one request."""

    kind: str                       # mapreduce, xmapreduce or basic
    fns: dict[str, list[str]]       # {"map": [text, name], "reduce": ..., "finalize": ...}
    database: str = "zarkov"
    input_names: list[str] = dataclasses.field(default_factory=lambda: ["event"])
    query: dict = dataclasses.field(default_factory=dict)
    output_name: str = "zagg.result"
    output_type: str = "replace"
    output_prefix: str = ""         # xmapreduce: prepended to each collection name
    args: list = dataclasses.field(default_factory=list)
    kwargs: dict = dataclasses.field(default_factory=dict)
    wait: bool = False
    #: ``replace`` jobs: an output of at most this many bytes (all collections
    #: together) is returned in the job's status (``inline``) instead of written.
    inline_max: int = 0


def _str(doc: Mapping[str, Any], field: str, default: Any = None) -> Any:
    value = doc.get(field)
    if value is None:
        if default is None:
            raise BadRequest(f"missing required field '{field}'")
        value = default
    # type(), not isinstance: bson's Code (JavaScript) is a str subclass, and no name.
    if type(value) is not str or (not value and field != "output_prefix"):
        raise BadRequest(f"field '{field}' must be a non-empty string, got {short_repr(value)}")
    return value


def _function(doc: Mapping[str, Any], prefix: str) -> list[str]:
    return [_str(doc, f"{prefix}_text"), _str(doc, f"{prefix}_name")]


def _has_function(doc: Mapping[str, Any], prefix: str) -> bool:
    return doc.get(f"{prefix}_text") is not None or doc.get(f"{prefix}_name") is not None


def _query(value: Any) -> dict:
    if value is None:
        return {}
    if isinstance(value, (bytes, bytearray)):
        try:
            return bson.decode(bytes(value), CODEC)
        except Exception as e:  # noqa: BLE001
            raise BadRequest(f"field 'query' is not a BSON-encoded document: {e}") from None
    if isinstance(value, Mapping):
        return dict(value)  # convenient for clients that send the filter as is
    raise BadRequest(f"field 'query' must be BSON-encoded binary, got {type(value).__name__}")


def _wait(doc: Mapping[str, Any]) -> bool:
    value = doc.get("wait")
    if value is None:
        return False
    if not isinstance(value, int):  # bool is an int; "no" must not mean yes
        raise BadRequest(f"field 'wait' must be true or false, got {short_repr(value)}")
    return bool(value)


def _inline_max(doc: Mapping[str, Any], output_type: str) -> int:
    value = doc.get("inline_max")
    if value is None:
        return 0
    if not is_int(value) or not 0 <= value <= INLINE_LIMIT:
        raise BadRequest(f"field 'inline_max' must be a number of bytes from 0 to "
                         f"{INLINE_LIMIT}, got {short_repr(value)}")
    if value and output_type != "replace":
        raise BadRequest(f"field 'inline_max' needs output_type 'replace', got "
                         f"{short_repr(output_type)}")
    return int(value)


def status_wait(doc: Mapping[str, Any]) -> float:
    """The ``wait`` of a ``status`` request: seconds to wait for the job to end (0: none)."""
    value = doc.get("wait")
    if value is None:
        return 0.0
    if not (is_int(value) or type(value) is float) or not 0 <= value <= STATUS_WAIT_LIMIT:
        raise BadRequest(f"field 'wait' must be a number of seconds from 0 to "
                         f"{STATUS_WAIT_LIMIT:g}, got {short_repr(value)}")
    return float(value)


def parse(command: str, doc: Mapping[str, Any], default_database: str = "zarkov") -> JobSpec:
    """The JobSpec of a job request; raises BadRequest naming the faulty field."""
    wait = _wait(doc)
    if command == "basic":
        fns = {"func": _function(doc, "func")}
        args = [] if doc.get("args") is None else doc["args"]
        kwargs = {} if doc.get("kwargs") is None else doc["kwargs"]
        if not isinstance(args, list):
            raise BadRequest(f"field 'args' must be a list, got {type(args).__name__}")
        if not isinstance(kwargs, Mapping):
            raise BadRequest(f"field 'kwargs' must be a document, got {type(kwargs).__name__}")
        return JobSpec("basic", fns, args=list(args), kwargs=dict(kwargs), wait=wait)
    if command not in JOB_COMMANDS:
        raise BadRequest(f"unknown job command '{command}'")
    fns = {"map": _function(doc, "map"), "reduce": _function(doc, "reduce")}
    if _has_function(doc, "finalize"):
        fns["finalize"] = _function(doc, "finalize")
    database = _str(doc, "database", default_database)
    if not _DB_NAME.match(database):
        raise BadRequest(f"field 'database': not a valid database name: "
                         f"{short_repr(database)}")
    names = doc.get("input_names", ["event"])
    if type(names) is str:
        names = [names]
    if not isinstance(names, list) or not names or not all(type(n) is str and n for n in names):
        raise BadRequest("field 'input_names' must be a non-empty list of names, "
                         f"got {short_repr(names)}")
    output_type = _str(doc, "output_type", "replace")
    if output_type not in OUTPUT_TYPES:
        raise BadRequest(f"field 'output_type' must be one of {', '.join(OUTPUT_TYPES)}, "
                         f"got {short_repr(output_type)}")
    return JobSpec(command, fns, database=database, input_names=list(names),
                   query=_query(doc.get("query")),
                   output_name=_str(doc, "output_name", "zagg.result"),
                   output_type=output_type,
                   output_prefix=_str(doc, "output_prefix", ""), wait=wait,
                   inline_max=_inline_max(doc, output_type))
