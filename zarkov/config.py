"""The one configuration of Zarkov: typed sections, each key with its default and check.

Every command builds a :class:`Config` with :func:`load` (a YAML file, or defaults)
or :func:`from_dict` and reads its settings as attributes (``config.mongo_uri``,
``config.zmr.reduce_count``, ``config.security.server_key``).  Each section is a
dataclass (:class:`Config`, :class:`ZmrConfig`, :class:`SecurityConfig`) whose
fields are the keys: the annotation is the type, the default is the default, and
the checks beyond the type live beside it (:func:`key`).  Errors name the file and
the key, so that ``zcmd`` prints them on one line and exits with 2.  Whatever the
file holds, :func:`load` returns a valid Config or raises ConfigError: never another
exception, never a message longer than a line.

Every bind address defaults to loopback; binding beyond it needs the CURVE keys of
the ``security`` section (or ``security.allow_insecure``), see :mod:`zarkov.security`.
Keys of earlier versions that did nothing are refused with the reason
(:data:`REMOVED`).
"""
from __future__ import annotations

import copy
import dataclasses
import ipaddress
import math
import os
import typing
from typing import Any, Callable, Mapping, Optional

import yaml

from zarkov import keyfiles
from zarkov.errors import ConfigError
from zarkov.oneline import first_line, short_repr

__all__ = ["Config", "ZmrConfig", "SecurityConfig", "ConfigError", "load", "from_dict",
           "defaults", "worker_processes", "REMOVED"]

#: A check beyond the type: what is wrong with a value, or None.
Check = Callable[[Any], Optional[str]]


def positive(value: Any) -> Optional[str]:
    """Greater than 0."""
    return f"must be greater than 0, got {short_repr(value)}" if value <= 0 else None


def not_negative(value: Any) -> Optional[str]:
    """0 or more (0 means "automatic" or "never" where the key says so)."""
    return f"must not be negative, got {short_repr(value)}" if value < 0 else None


def tcp_port(value: Any) -> Optional[str]:
    """A TCP port, or 0."""
    if value < 0:
        return f"must not be negative, got {short_repr(value)}"
    return f"not a TCP port, got {short_repr(value)}" if value > 65535 else None


def token(value: Optional[str]) -> Optional[str]:
    """A bearer token of 16+ characters, or null.  Why a minimum: the token is the only
    thing between the network and the data."""
    if value is not None and len(value) < 16:
        return "must be at least 16 characters (or null for none)"
    return None


def networks(value: list) -> Optional[str]:
    """A list of IP addresses or networks."""
    for item in value:
        try:
            if not isinstance(item, str):
                raise ValueError(item)
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"{short_repr(item)} is not an IP address or network"
    return None


def one_of(*choices: str) -> Check:
    """One of ``choices``."""
    def check(value: Any) -> Optional[str]:
        if value in choices:
            return None
        return f"must be one of {', '.join(choices)}, got {short_repr(value)}"
    return check


#: The map-reduce engines (``zmr.engine``).
ENGINES = ("router", "dask")


def dask_address(value: str) -> Optional[str]:
    """``local``, or a Dask scheduler's ``tcp://`` or ``tls://`` address."""
    if value == "local":
        return None
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("tcp", "tls") or not rest:
        return f"'local', tcp://host:port or tls://host:port, got {short_repr(value)}"
    return None


def key(default: Any, *checks: Check, doc: str = "") -> Any:
    """A config key: its default, its checks beyond the type, what it is for."""
    meta = {"checks": checks, "doc": doc}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default),
                                 metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class _Section:
    """What every section can do."""

    def as_dict(self) -> dict[str, Any]:
        """A plain (nested) dict of the section's keys."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclasses.dataclass
class ZmrConfig(_Section):
    """The map-reduce cluster (``zmr:``)."""

    req_uri: str = key("tcp://127.0.0.1:5555", doc="where clients and workers connect")
    req_bind: str = key("tcp://127.0.0.1:5555", doc="where the router listens")
    worker_uri: str = key("tcp://127.0.0.1", doc="where the router binds its worker sockets")
    src_port: int = key(0, tcp_port, doc="the tasks socket's port (0: random)")
    sink_port: int = key(0, tcp_port, doc="the heartbeats socket's port (0: random)")
    local_workers: int = key(2, not_negative, doc="worker processes `serve` starts")
    processes_per_worker: int = key(0, not_negative,
                                    doc="worker processes of `zmr-worker` (0: one per core)")
    reduce_count: int = key(256, positive, doc="reduce partitions")
    map_chunk_size: int = key(5000000, positive, doc="bytes of input per map chunk")
    outstanding_chunks: int = key(4, positive, doc="least tasks of a job in flight")
    max_chunk_timeout: float = key(600, positive,
                                   doc="seconds a task may take at most before it is sent "
                                       "again (the limit adapts below it)")
    request_greenlets: int = key(16, positive, doc="requests the router serves at once")
    job_root: str = key("/tmp/zmr", doc="the router's temporary job files (relative "
                                             "to the working directory)")
    event_limit: int = key(100000, positive, doc="most events one incremental run takes")
    requests_per_worker_process: int = key(256, positive,
                                           doc="tasks after which a worker recycles itself")
    suicide_level: int = key(3145728, positive,
                             doc="KiB of RSS after which a worker recycles itself")
    engine: str = key("router", one_of(*ENGINES), doc="what runs map-reduce jobs: the "
                      "ZeroMQ router, or Dask distributed (pip install 'zarkov[dask]'; "
                      "docs/dask-engine.md)")
    dask_scheduler: str = key("local", dask_address, doc="the Dask scheduler: 'local' (a "
                              "cluster of this process on 127.0.0.1), tcp://host:port "
                              "(loopback, unless allow_insecure) or tls://host:port")
    dask_workers: int = key(0, not_negative, doc="worker processes of a 'local' Dask "
                            "cluster (0: one per core)")


@dataclasses.dataclass
class SecurityConfig(_Section):
    """CURVE authentication and encryption of every ZeroMQ socket (``security:``; see
    :mod:`zarkov.security`).  Relative paths are relative to the config file."""

    server_key: Optional[str] = key(None, doc="the servers' key pair (*.key_secret): set "
                                    "on hosts that run the router, the event logger or "
                                    "serve; turns CURVE on for every socket they bind")
    authorized_keys: Optional[str] = key(None, doc="directory of the client public keys "
                                         "(*.key) allowed in; needed with server_key")
    server_public_key: Optional[str] = key(None, doc="the servers' public key (*.key) on "
                                           "hosts that only connect (default: the public "
                                           "half of server_key)")
    client_key: Optional[str] = key(None, doc="this host's key pair (*.key_secret) for "
                                    "workers, zcmd aggregate, ZarkovClient and zsend "
                                    "(default: server_key)")
    allow_insecure: bool = key(False, doc="bind beyond loopback without keys anyway "
                                          "(warned about at every start)")
    dask_tls_ca: Optional[str] = key(None, doc="Dask's TLS (zmr.engine: dask): the CA "
                                     "that signed the scheduler's and workers' certificates")
    dask_tls_cert: Optional[str] = key(None, doc="this host's certificate (PEM) for Dask")
    dask_tls_key: Optional[str] = key(None, doc="this host's private key (PEM) for Dask")

    def validate(self, source: str) -> None:
        """The keys name readable key files of the right kind, and go together."""

        def fail(name: str, why: str) -> None:
            raise ConfigError(f"{source}: key 'security.{name}': {why}")

        for name, secret in (("server_key", True), ("server_public_key", False),
                             ("client_key", True)):
            path = getattr(self, name)
            if path is not None:
                try:
                    keyfiles.read_key_file(path, secret=secret)
                except keyfiles.KeyFileError as e:
                    fail(name, f"{e}; make one with " + (
                        "'zcmd keys init <dir>' (the servers' pair)" if name == "server_key"
                        else "'zcmd keys new <dir> <name>'"))
        if self.server_key is not None and self.authorized_keys is None:
            fail("authorized_keys", "needed with security.server_key: the directory of the "
                 "client public keys allowed in (zcmd keys authorize <file>)")
        if self.authorized_keys is not None and not os.path.isdir(self.authorized_keys):
            fail("authorized_keys", f"{self.authorized_keys}: no such directory")
        tls = ("dask_tls_ca", "dask_tls_cert", "dask_tls_key")
        given = [name for name in tls if getattr(self, name) is not None]
        if given and len(given) < len(tls):
            missing = next(name for name in tls if name not in given)
            fail(missing, "dask_tls_ca, dask_tls_cert and dask_tls_key go together (Dask's "
                 "TLS: a CA, and this host's certificate and key)")
        for name in given:
            if not os.path.isfile(getattr(self, name)):
                fail(name, f"{getattr(self, name)}: no such file")
        if self.server_key is None:
            for have, need in (("client_key", "server_public_key"),
                               ("server_public_key", "client_key")):
                if getattr(self, have) is not None and getattr(self, need) is None:
                    fail(need, f"needed with security.{have} (a client needs the servers' "
                         "public key and a key pair of its own)")


#: The security keys that name files or directories (relative to the config file).
SECURITY_PATHS = ("server_key", "authorized_keys", "server_public_key", "client_key",
                  "dask_tls_ca", "dask_tls_cert", "dask_tls_key")


@dataclasses.dataclass
class MetricsConfig(_Section):
    """Prometheus ``/metrics`` of the processes run apart (``metrics:``); the web
    service serves its own on ``web_port``.  0: no endpoint."""
    bind: str = key("127.0.0.1", doc="where the endpoints below listen (beyond loopback: "
                                     "web_token required)")
    eventlog_port: int = key(0, tcp_port, doc="the event logger's /metrics (every event "
                                              "server of the process tree)")
    router_port: int = key(0, tcp_port, doc="the router's /metrics")
    worker_port: int = key(0, tcp_port, doc="a worker pool's /metrics (its processes "
                                            "summed)")


@dataclasses.dataclass
class Config(_Section):
    """The whole validated configuration: top-level keys, ``zmr`` and ``security``."""

    mongo_uri: str = key("mongodb://localhost:27017")
    mongo_database: str = key("zarkov")
    bson_bind_address: str = key("tcp://127.0.0.1:6543", doc="where BSON events come in")
    json_bind_address: str = key("tcp://127.0.0.1:6544", doc="where JSON events come in")
    bson_uri: str = key("tcp://127.0.0.1:6543", doc="where clients push events")
    publish_bind_address: str = key("tcp://127.0.0.1:6545",
                                    doc="the PUB socket announcing finished aggregations")
    web_port: int = key(8081, tcp_port, doc="the web service (0: not run by `serve`)")
    web_bind: str = key("127.0.0.1", doc="where the web service listens (beyond loopback: "
                                         "web_token needed)")
    web_token: Optional[str] = key(None, token, doc="bearer token the query API and the "
                                   "dashboard require (always, when set)")
    web_trusted_proxies: list = key([], networks, doc="reverse proxies (addresses or "
                                    "networks) whose X-Forwarded-For the beacon believes")
    lag_warning_seconds: float = key(60.0, positive, doc="an AggDef whose oldest waiting "
                                     "event is older than this is shown late (dashboard)")
    journal: str = key("journal", doc="directory of the write-ahead journal (relative to "
                                       "the working directory)")
    journal_file_size: int = key(262144, positive, doc="bytes of a journal file")
    rejects_file_size: int = key(16 << 20, positive, doc="bytes of the rejects file "
                                 "(journal/rejects.jsonl) before it is rotated")
    rejects_files: int = key(4, not_negative, doc="rotated rejects files kept "
                             "(rejects.jsonl.1 …)")
    num_event_servers: int = key(0, not_negative,
                                 doc="event-server processes (0: one per core)")
    num_event_logs: int = key(4, positive, doc="rotated event collections kept")
    verbose: bool = key(False, doc="log at DEBUG")
    realtime_interval: float = key(5.0, positive, doc="the longest a real-time AggDef "
                                   "waits between two runs when the logger tells nothing")
    sweep_interval: float = key(60.0, not_negative, doc="seconds between two sweeps (the "
                                "look for events without a position, written by other "
                                "programs) where one reads the whole input (the bundled "
                                "servers); 0: every run.  MongoDB: every run")
    agg_lease_seconds: float = key(60.0, positive, doc="how long a run's lease lasts "
                                   "without renewal (another host may take it over then)")
    shared_key: Optional[str] = key(None, doc="shared password of event senders' first "
                                    "frame (in clear without CURVE: not authentication)")
    log_file: str = key("-", doc="where every process logs (relative to the config "
                                 "file; reopened after logrotate); '-' is stderr")
    zmr: ZmrConfig = dataclasses.field(default_factory=ZmrConfig)
    security: SecurityConfig = dataclasses.field(default_factory=SecurityConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    #: Where the config came from (a file's path, ``<defaults>``): errors name it.
    source: str = dataclasses.field(default="<defaults>", compare=False)

    def validate(self) -> "Config":
        """Check every key against its type and checks; raise ConfigError naming it."""
        data = self.as_dict()
        data.pop("source", None)
        _validate(data, self.source)
        return self


#: The sections (name -> dataclass) and the top level.
SECTIONS: dict[str, type] = {"zmr": ZmrConfig, "security": SecurityConfig,
                             "metrics": MetricsConfig}

#: Keys of earlier versions that did nothing, and why.
REMOVED = {
    "journal_min_files": "the journal does not pre-allocate files",
    "zmr.map_chunks_per_page": "the router reads its input in server batches, not pages",
    "zmr.compress": "chunks travel uncompressed",
}


def _fields(cls: type) -> dict[str, tuple[tuple, tuple]]:
    """``{key: (types, checks)}`` of a section's dataclass."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == "source" or f.name in SECTIONS:
            continue
        out[f.name] = (_types(hints[f.name]), tuple(f.metadata.get("checks", ())))
    return out


def _types(hint: Any) -> tuple:
    """The Python types a key of annotation ``hint`` accepts (float takes int too)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union:
        return tuple(t for a in args for t in _types(a))
    if hint is float:
        return (int, float)
    if hint is type(None):
        return (type(None),)
    return (typing.get_origin(hint) or hint,)


_TOP = _fields(Config)
_SECTION_FIELDS = {name: _fields(cls) for name, cls in SECTIONS.items()}

# Views by key, for tests and tools: ``{key: (types, default)}`` and the keys that
# must be positive.
TOP_SCHEMA = {k: (t, getattr(Config(), k)) for k, (t, _) in _TOP.items()}
SECTION_SCHEMAS = {name: {k: (t, getattr(cls(), k)) for k, (t, _) in _SECTION_FIELDS[name].items()}
                   for name, cls in SECTIONS.items()}
POSITIVE = {(f"{s}.{k}" if s else k) for s, fields in [("", _TOP), *_SECTION_FIELDS.items()]
            for k, (_, checks) in fields.items() if positive in checks}


def defaults() -> dict[str, Any]:
    """The default value of every key, as a nested dict."""
    data = Config().as_dict()
    data.pop("source")
    return data


def _type_name(types: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             type(None): "null", list: "a list"}
    if int in types and float in types:
        types = tuple(t for t in types if t is not int)
    return " or ".join(names.get(x, x.__name__) for x in types)


def _check(name: str, value: Any, types: tuple, checks: tuple, source: str) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise ConfigError(f"{source}: key '{name}': expected {_type_name(types)}, "
                          f"got {short_repr(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: key '{name}': must be a finite number, got {value!r}")
    for check in checks:
        problem = check(value)
        if problem:
            raise ConfigError(f"{source}: key '{name}': {problem}")


def _key_name(name: Any) -> str:
    return first_line(str(name), 60)


def _refuse_removed(name: str, source: str) -> None:
    if name in REMOVED:
        raise ConfigError(f"{source}: key '{name}' was removed ({REMOVED[name]}); delete it")


def _validate(data: Mapping[str, Any], source: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the file must hold a mapping of keys, "
                          f"got {type(data).__name__}")
    for name, value in data.items():
        if name in SECTIONS:
            fields = _SECTION_FIELDS[name]
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: key '{name}': expected a mapping, "
                                  f"got {short_repr(value)}")
            for sub, subvalue in value.items():
                dotted = f"{name}.{_key_name(sub)}"
                _refuse_removed(dotted, source)
                if sub not in fields:
                    raise ConfigError(f"{source}: unknown key '{dotted}'")
                _check(dotted, subvalue, *fields[sub], source)
        else:
            _refuse_removed(str(name), source)
            if name not in _TOP:
                raise ConfigError(f"{source}: unknown key '{_key_name(name)}'")
            _check(name, value, *_TOP[name], source)


def from_dict(data: Optional[Mapping[str, Any]] = None, source: str = "<config>") -> Config:
    """Build a validated Config from a (partial) nested dict over the defaults."""
    data = dict(data or {})
    data.pop("source", None)
    _validate(data, source)
    sections = {name: cls(**dict(data.get(name) or {})) for name, cls in SECTIONS.items()}
    top = {k: copy.deepcopy(v) for k, v in data.items() if k not in SECTIONS}
    cfg = Config(**top, **sections, source=source)
    cfg.security.validate(source)
    return cfg


def _resolve_paths(data: dict[str, Any], path: str) -> None:
    """Make the relative paths of ``data`` (the key files of ``security``, ``log_file``)
    relative to ``path``'s directory, so that children started elsewhere agree."""
    base = os.path.dirname(os.path.abspath(path))
    log_file = data.get("log_file")
    if isinstance(log_file, str) and log_file not in ("", "-"):
        data["log_file"] = os.path.join(base, os.path.expanduser(log_file))
    sec = data.get("security")
    if not isinstance(sec, dict):
        return
    for name in SECURITY_PATHS:
        value = sec.get(name)
        if isinstance(value, str) and value:
            sec[name] = os.path.join(base, os.path.expanduser(value))


def _read(path: str) -> Any:
    """The YAML document of ``path``; ConfigError (one line) whatever goes wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: YAML syntax error{where}: {first_line(problem)}") \
            from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") \
            from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deep") from None
    except Exception as e:  # noqa: BLE001 - e.g. a date such as 2024-13-01 (ValueError)
        raise ConfigError(f"{path}: cannot read the YAML: {type(e).__name__}: "
                          f"{first_line(e)}") from None


def load(path: Optional[str], overrides: Optional[Mapping[str, Any]] = None) -> Config:
    """Load a YAML file (or only defaults when ``path`` is None), apply overrides.

    ``overrides`` maps dotted keys (``mongo_uri``, ``zmr.req_uri``) to values.
    """
    data: dict[str, Any] = {}
    source = path or "<defaults>"
    if path is not None:
        loaded = _read(path)
        if loaded is not None:
            if not isinstance(loaded, Mapping):
                raise ConfigError(f"{path}: the file must hold a mapping of keys, "
                                  f"got {type(loaded).__name__}")
            data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in loaded.items()}
            _resolve_paths(data, path)
    for dotted, value in (overrides or {}).items():
        if "." in dotted:
            section, name = dotted.split(".", 1)
            if not isinstance(data.setdefault(section, {}), dict):
                raise ConfigError(f"{source}: key '{section}': expected a mapping, "
                                  f"got {short_repr(data[section])}")
            data[section][name] = value
        else:
            data[dotted] = value
    return from_dict(data, source)


def worker_processes(n: int) -> int:
    """Resolve a process count where 0 means one per core."""
    return n if n > 0 else (os.cpu_count() or 1)
