"""Hypothesis strategies for fuzzing Zarkov's input surfaces, and the fuzz budget.

Every surface that takes input from outside is fuzzed with these: the event
sockets (BSON and JSON messages), the router's request, tasks and sink sockets, the config
loader, and whatever comes next (the HTTP endpoints can draw query values from
:func:`scalars`, :func:`bson_values` and :func:`nasty_text`).

Budget: :func:`fuzz_settings` gives each test a fixed number of examples.  ``make
test`` runs them derandomized (the same inputs on every run, so CI is repeatable);
``make fuzz`` sets ``ZARKOV_FUZZ_PROFILE=fuzz``: random inputs, :data:`FUZZ_FACTOR`
times as many (``ZARKOV_FUZZ_FACTOR``, default 50).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import struct
from typing import Any

import bson
from bson import Binary, Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from zarkov.zmr.jobspec import INLINE_LIMIT

PROFILE = os.environ.get("ZARKOV_FUZZ_PROFILE", "ci")
FUZZ_FACTOR = int(os.environ.get("ZARKOV_FUZZ_FACTOR", "50")) if PROFILE == "fuzz" else 1

settings.register_profile("ci", derandomize=True, database=None, deadline=None,
                          suppress_health_check=list(HealthCheck), print_blob=True)
# No example database in either: hypothesis 6.170 fails while replaying stored examples
# that hold str, int or bytes subclasses (bson's Code, Int64, Binary); a failure
# prints its reproduction blob instead.
settings.register_profile("fuzz", derandomize=False, database=None, deadline=None,
                          suppress_health_check=list(HealthCheck), print_blob=True)
settings.load_profile(PROFILE)

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def fuzz_settings(examples: int) -> settings:
    """The settings of a fuzz test: ``examples`` inputs (times FUZZ_FACTOR in make fuzz)."""
    return settings(max_examples=examples * FUZZ_FACTOR)


# -- text and scalars -------------------------------------------------------------------

def nasty_text(max_size: int = 20) -> st.SearchStrategy[str]:
    """Text that trips parsers: unicode of every plane, controls, quotes, dots, dollars."""
    specials = st.sampled_from(["", "$", ".", "a.b", "$where", "\x00", "\n", '"', "\\",
                                "\u2028", "\ufeff", "😀", "e\u0301", "%s", "{}", "[]",
                                "null", "NaN", "-0", "1e999", "${x}", "'; drop --"])
    chars = st.characters(codec="utf-8")  # no lone surrogates: BSON cannot carry them
    return st.one_of(st.text(chars, max_size=max_size), specials)


def keys() -> st.SearchStrategy[str]:
    """Document keys BSON can encode (no NUL), dots and dollars included."""
    return nasty_text(12).filter(lambda k: "\x00" not in k)


def scalars() -> st.SearchStrategy[Any]:
    """JSON scalars, numbers of every size and the float specials included."""
    return st.one_of(st.none(), st.booleans(), st.integers(),
                     st.floats(), nasty_text())


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON value (lists, objects, ``$datetime`` objects of any number)."""
    leaves = st.one_of(scalars(), st.builds(lambda n: {"$datetime": n},
                                            st.one_of(st.integers(), st.floats(), st.text())))
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(nasty_text(10), inner, max_size=4)),
        max_leaves=max_leaves)


def _datetimes() -> st.SearchStrategy[dt.datetime]:
    # BSON keeps milliseconds; naive UTC, as pymongo returns them.
    return st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31))


def bson_scalars(nan: bool = False) -> st.SearchStrategy[Any]:
    """Values BSON can encode, of every BSON type.  NaN only when ``nan``: some
    servers close the connection on it, which costs the committer a second each."""
    return st.one_of(
        st.none(), st.booleans(), st.integers(INT64_MIN, INT64_MAX),
        st.floats(allow_nan=nan), nasty_text().filter(lambda t: "\x00" not in t),
        st.binary(max_size=20), st.builds(Binary, st.binary(max_size=8), st.integers(0, 255)),
        _datetimes(), st.builds(ObjectId), st.builds(Int64, st.integers(INT64_MIN, INT64_MAX)),
        st.builds(Regex, st.sampled_from(["^a", "(", "x*"]), st.sampled_from(["", "i"])),
        st.builds(Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
        st.builds(Decimal128, st.sampled_from(["1.5", "-0", "NaN", "Infinity", "1E+6144"])),
        st.just(MinKey()), st.just(MaxKey()), st.builds(Code, st.sampled_from(["x", "1+"])))


def bson_values(max_leaves: int = 12, nan: bool = False) -> st.SearchStrategy[Any]:
    """Any BSON value: scalars, arrays (nested too) and documents."""
    return st.recursive(bson_scalars(nan), lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(keys(), inner, max_size=4)),
        max_leaves=max_leaves)


# -- events -----------------------------------------------------------------------------

def events(values: st.SearchStrategy[Any], timestamps: st.SearchStrategy[Any],
           key: st.SearchStrategy[str], ids: st.SearchStrategy[Any]) -> st.SearchStrategy[dict]:
    """Event-shaped documents with a wrong type, a missing field or an unknown field
    now and then: ``type``, ``context``, ``extra``, ``timestamp``, ``$command``, ``_id``."""
    return st.fixed_dictionaries({}, optional={
        "type": st.one_of(nasty_text(), values),
        "context": st.one_of(st.dictionaries(key, values, max_size=5), values),
        "extra": values,
        "timestamp": st.one_of(timestamps, values),
        "$command": st.one_of(st.just("event_noval"), nasty_text()),
        "_id": st.one_of(ids, values),
        "colour": values,
    }).flatmap(lambda d: st.dictionaries(key, values, max_size=2).map(lambda more: {**more, **d}))


def bson_events(nan: bool = False) -> st.SearchStrategy[dict]:
    """Event-shaped BSON documents (see :func:`events`)."""
    return events(bson_values(8, nan), _datetimes(), keys(), st.builds(ObjectId))


def json_events() -> st.SearchStrategy[dict]:
    """Event-shaped JSON objects (see :func:`events`)."""
    return events(json_values(8), st.builds(lambda n: {"$datetime": n}, st.integers(0, 2**33)),
                  nasty_text(10), nasty_text(24))


def deep_bson(depth: int, key: bytes = b"x") -> bytes:
    """A BSON event whose ``context`` nests ``depth`` documents (built by hand, in
    linear time: pymongo's encoder stops near Python's recursion limit)."""
    heads = []
    size = 5  # the innermost, empty document
    for _ in range(depth):
        size += 4 + 1 + len(key) + 1 + 1  # its length, type byte, key, NUL ... its end NUL
        heads.append(struct.pack("<i", size) + b"\x03" + key + b"\x00")
    inner = b"".join(reversed(heads)) + b"\x05\x00\x00\x00\x00" + b"\x00" * depth
    body = (b"\x02type\x00" + struct.pack("<i", 5) + b"deep\x00" + b"\x03context\x00"
            + inner + b"\x00")
    return struct.pack("<i", len(body) + 4) + body


def deep_json(depth: int, open_: str = "[", close: str = "]") -> bytes:
    """A JSON event whose ``context.x`` nests ``depth`` arrays (or objects)."""
    if open_ == "{":
        return (b'{"type": "deep", "context": {"x": ' + b'{"a": ' * depth + b"1"
                + b"}" * depth + b"}}")
    return (b'{"type": "deep", "context": {"x": ' + open_.encode() * depth
            + close.encode() * depth + b"}}")


def _mutate(data: bytes, how: int, pos: int, junk: bytes) -> bytes:
    pos = pos % (len(data) + 1)
    if how == 0:
        return data[:pos]                        # truncated
    if how == 1:
        return data[:pos] + junk + data[pos:]    # bytes inserted
    if how == 2:
        return data + junk                       # trailing garbage
    return data[:pos] + junk + data[pos + len(junk):]  # bytes overwritten


def mutated(messages: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Messages truncated, with bytes inserted, appended or overwritten."""
    return st.builds(_mutate, messages, st.integers(0, 3), st.integers(0, 1 << 16),
                     st.binary(min_size=1, max_size=8))


def bson_messages() -> st.SearchStrategy[bytes]:
    """What a BSON event socket may receive: events, mutants, deep nests, random bytes."""
    encoded = bson_events().map(bson.encode)
    return st.one_of(encoded, encoded, mutated(encoded), st.binary(max_size=64),
                     st.integers(95, 1300).map(deep_bson),
                     st.builds(lambda a, b: a + b, encoded, encoded))  # two documents


def _dump(obj: Any) -> str:
    return json.dumps(obj, allow_nan=True)


def json_messages() -> st.SearchStrategy[bytes]:
    """What a JSON event socket may receive: events (NaN, huge integers, duplicate keys,
    bad UTF-8 …), mutants, deep nests, other JSON values, random bytes."""
    text = json_events().map(_dump)
    dup = st.builds(lambda t, k: t[:-1] + (", " if len(t) > 2 else "") + f'"{k}": 1, "{k}": 2}}',
                    json_events().map(_dump), st.sampled_from(["type", "extra", "x"]))
    return st.one_of(
        text.map(str.encode), text.map(lambda t: t.encode("utf-16")), mutated(text.map(str.encode)),
        dup.map(str.encode), json_values().map(lambda v: _dump(v).encode()),
        st.sampled_from([b'{"type": "t", "extra": "\\ud800"}', b'\xef\xbb\xbf{"type": "bom"}',
                         b'{"type": "t", "extra": 1' + b"0" * 5000 + b"}", b"", b"{}", b"null",
                         b'{"type": "t", "extra": -Infinity}', b'{"type": "\xed\xa0\x80"}']),
        st.tuples(st.integers(95, 2000), st.sampled_from([("[", "]"), ("{", "}")])).map(
            lambda a: deep_json(a[0], *a[1])),
        st.binary(max_size=64))


def multipart(messages: st.SearchStrategy[bytes]) -> st.SearchStrategy[list[bytes]]:
    """ZeroMQ messages: mostly one frame, sometimes two (a key frame) or more."""
    return st.one_of(messages.map(lambda m: [m]), messages.map(lambda m: [m]),
                     st.lists(messages, min_size=2, max_size=4))


# -- router requests --------------------------------------------------------------------

MAP = "def m(objs):\n    for o in objs:\n        yield o.get('type'), 1\n"
REDUCE = "def r(key, values):\n    return sum(values)\n"
XMAP = ("def xm(objs):\n    for o in objs:\n"
        "        yield {'c': 'per_type', 'k': o.get('type'), 'v': 1}\n")
XREDUCE = "def xr(coll, key, values):\n    return sum(values)\n"
BASIC = "def b(*args, **kwargs):\n    return len(args) + len(kwargs)\n"

COMMANDS = ("echo", "config", "mapreduce", "xmapreduce", "basic", "status")  # never terminate


def job_request(kind: str, database: str) -> dict:
    """A valid job request of ``kind`` (mapreduce, xmapreduce, basic)."""
    if kind == "basic":
        return {"$command": "basic", "func_text": BASIC, "func_name": "b", "args": [1],
                "kwargs": {"k": 2}}
    fns = (MAP, "m", REDUCE, "r") if kind == "mapreduce" else (XMAP, "xm", XREDUCE, "xr")
    return {"$command": kind, "database": database, "input_names": ["event"],
            "query": bson.encode({}), "map_text": fns[0], "map_name": fns[1],
            "reduce_text": fns[2], "reduce_name": fns[3], "output_name": "zagg.fuzz",
            "output_type": "replace"}


def _not(*types: type) -> st.SearchStrategy[Any]:
    """BSON values of none of ``types`` (bool is not an int here)."""
    def wrong(v: Any) -> bool:
        if isinstance(v, bool):
            return bool not in types
        return v is not None and not isinstance(v, types)
    return bson_values(6).filter(wrong)


# field -> values that are wrong for it, whatever the rest of the request
WRONG = {
    "map_text": _not(str), "map_name": _not(str), "reduce_text": _not(str),
    "reduce_name": _not(str), "finalize_name": _not(str), "output_name": _not(str),
    "output_prefix": _not(str), "func_text": _not(str), "func_name": _not(str),
    "database": st.one_of(_not(str), st.sampled_from(["", "a b", "a.b", "x" * 64, "$db"])),
    "input_names": st.one_of(_not(str, list), st.just([]), st.lists(_not(str), min_size=1,
                                                                    max_size=3)),
    "output_type": st.one_of(_not(str), st.sampled_from(["", "append", "REPLACE"])),
    "query": st.one_of(_not(bytes, dict), st.binary(min_size=1, max_size=12).filter(
        lambda b: not _is_bson(b))),
    "args": _not(list), "kwargs": _not(dict), "wait": _not(bool, int),
    "inline_max": st.one_of(_not(int), st.integers(max_value=-1),
                            st.integers(min_value=INLINE_LIMIT + 1)),
}
FIELDS_OF = {
    "mapreduce": ("map_text", "map_name", "reduce_text", "reduce_name", "finalize_name",
                  "output_name", "database", "input_names", "output_type", "query", "wait",
                  "inline_max"),
    "xmapreduce": ("map_text", "map_name", "reduce_text", "reduce_name", "output_prefix",
                   "database", "input_names", "output_type", "query", "wait"),
    "basic": ("func_text", "func_name", "args", "kwargs", "wait"),
}


def _is_bson(data: bytes) -> bool:
    try:
        bson.decode(data)
        return True
    except Exception:  # noqa: BLE001
        return False


def wrong_field_requests(database: str) -> st.SearchStrategy[tuple[dict, str]]:
    """(request, field): a valid job request with ``field`` given a wrong value."""
    def build(kind: str) -> st.SearchStrategy[tuple[dict, str]]:
        return st.sampled_from(FIELDS_OF[kind]).flatmap(
            lambda field: WRONG[field].map(
                lambda value: ({**job_request(kind, database), field: value,
                                **({"finalize_text": MAP} if field == "finalize_name" else {})},
                               field)))
    return st.sampled_from(sorted(FIELDS_OF)).flatmap(build)


def random_requests() -> st.SearchStrategy[dict]:
    """Requests with a known or random ``$command`` (never ``terminate``) and random fields."""
    command = st.one_of(st.sampled_from(COMMANDS), nasty_text(),
                        bson_scalars()).filter(lambda c: c != "terminate")
    return st.builds(lambda c, more: {**more, "$command": c}, command,
                     st.dictionaries(st.one_of(keys(), st.sampled_from(
                         sorted({f for fs in FIELDS_OF.values() for f in fs} | {"job_id"}))),
                         bson_values(6), max_size=6))


def sink_messages() -> st.SearchStrategy[list[bytes]]:
    """What the router's worker sockets (tasks and sink) may receive from a stranger:
    forged heartbeats, requests for tasks, replies and goodbyes with fields of any
    type (or of the right types with any value), random bytes, several frames."""
    small = st.one_of(st.integers(-2, 70), st.integers(INT64_MIN, INT64_MAX), bson_values(2))
    ready = st.one_of(
        bson_values(3),
        st.fixed_dictionaries({}, optional={"pid": small, "host": st.one_of(nasty_text(8),
                                                                          bson_values(2)),
                                            "seen": small, "free": small}))
    header = st.one_of(
        st.fixed_dictionaries({"hb": bson_values(3)}, optional={"host": bson_values(3),
                                                                "errors": bson_values(3)}),
        st.fixed_dictionaries({}, optional={"j": bson_values(3), "t": bson_values(3),
                                            "ok": bson_values(3), "traceback": bson_values(3),
                                            "ready": ready}),
        st.fixed_dictionaries({"ready": ready}),
        st.fixed_dictionaries({"bye": small}, optional={"host": bson_values(3)}),
        st.dictionaries(keys(), bson_values(4), max_size=4))
    return st.tuples(st.one_of(header.map(bson.encode), st.binary(max_size=40)),
                     st.lists(st.binary(max_size=40), max_size=3)).map(lambda t: [t[0], *t[1]])


# -- config files -----------------------------------------------------------------------

def yaml_texts(schema_keys: list[str]) -> st.SearchStrategy[bytes]:
    """YAML files: the schema's keys with values of any type, random keys, tags,
    anchors, aliases, deep nests, dates that do not exist, bytes that are not UTF-8."""
    import yaml

    value = st.recursive(
        st.one_of(scalars(), _datetimes(), st.dates()),
        lambda inner: st.one_of(st.lists(inner, max_size=3),
                                st.dictionaries(nasty_text(8), inner, max_size=3)),
        max_leaves=6)
    key = st.one_of(st.sampled_from(schema_keys), nasty_text(8))
    zmr = st.dictionaries(st.one_of(st.sampled_from(schema_keys), nasty_text(8)), value,
                          max_size=4)
    mapping = st.dictionaries(key, st.one_of(value, zmr), max_size=6)

    def dump(d: dict) -> str:
        return yaml.safe_dump(d, allow_unicode=True)

    fragments = st.sampled_from([
        "mongo_uri: !!python/object/apply:os.system ['true']\n", "zmr: !!binary 'a'\n",
        "mongo_uri: 2024-13-45\n", "web_port: 0x1F\n", "web_port: 1_0\n", "verbose: yes\n",
        "realtime_interval: .nan\n", "realtime_interval: -.inf\n", "x: &a [1, *a]\n",
        "a: &a [1,2,3,4,5,6,7,8,9]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
        "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
        "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nmongo_uri: *e\n",
        "mongo_uri: *nowhere\n", "? [1, 2]\n: x\n", "%YAML 9.9\n---\na: 1\n", "--- 1\n--- 2\n",
        "zmr: {" * 40 + "}" * 40 + "\n", "mongo_uri: " + "[" * 600 + "]" * 600 + "\n",
        "\tmongo_uri: x\n", "mongo_uri: 'a\n", "!!map {? a : b}\n", "<<: {mongo_uri: x}\n",
        "security: {server_key: /nowhere/server.key_secret}\n",
        "security: {server_key: \"a\\0b\"}\n", "security: {client_key: .}\n",
        "security: {authorized_keys: /dev/null}\n", "security: {allow_insecure: 1}\n",
        "security: [server_key]\n"])
    text = st.one_of(mapping.map(dump), fragments,
                     st.lists(st.one_of(fragments, mapping.map(dump)), max_size=3).map("".join),
                     st.text(max_size=60))
    raw = st.one_of(text.map(lambda t: t.encode("utf-8")), st.binary(max_size=60),
                    text.map(lambda t: b"\xff\xfe" + t.encode("utf-8")))
    return raw
