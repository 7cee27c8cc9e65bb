"""The one configuration schema of Zarkov: defaults, YAML loading and validation.

Every command builds a :class:`Config` with :func:`load` and reads its settings as
attributes (``config.mongo_uri``, ``config.zmr.reduce_count``,
``config.security.server_key``).  Errors name the file and the key, so that ``zcmd``
can print them on one line and exit with 2.  Whatever the file holds, :func:`load`
returns a valid Config or raises ConfigError: never another exception, never a
message longer than a line.

Every bind address defaults to loopback; binding beyond it needs the CURVE keys of
the ``security`` section (or ``security.allow_insecure``), see :mod:`zarkov.security`.
"""
from __future__ import annotations

import copy
import ipaddress
import math
import os
from typing import Any, Mapping

import yaml

from zarkov.oneline import first_line, short_repr


class ConfigError(Exception):
    """A configuration file or value that cannot be used; the message names it."""


# key: (type or tuple of types, default).  ``None`` as a default means "unset".
TOP_SCHEMA: dict[str, tuple[Any, Any]] = {
    "mongo_uri": (str, "mongodb://localhost:27017"),
    "mongo_database": (str, "zarkov"),
    "bson_bind_address": (str, "tcp://127.0.0.1:6543"),
    "json_bind_address": (str, "tcp://127.0.0.1:6544"),
    "bson_uri": (str, "tcp://127.0.0.1:6543"),
    "publish_bind_address": (str, "tcp://127.0.0.1:6545"),
    # The web service (JSON API, dashboard, events over HTTP); 0 = not run by `serve`.
    "web_port": (int, 8081),
    # Address the web service listens on.  Beyond loopback it needs `web_token`.
    "web_bind": (str, "127.0.0.1"),
    # Bearer token the query API and the dashboard require (always, when set).
    "web_token": ((str, type(None)), None),
    # Addresses (or networks) of reverse proxies whose X-Forwarded-For is believed.
    "web_trusted_proxies": (list, []),
    "journal": (str, "journal"),
    "journal_file_size": (int, 262144),
    "journal_min_files": (int, 4),
    "num_event_servers": (int, 0),
    "num_event_logs": (int, 4),
    "verbose": (bool, False),
    # Seconds between two runs of the real-time aggregation loop of `serve`.
    "realtime_interval": ((int, float), 5.0),
    # Seconds between two sweeps of an AggDef (the look for events without a position,
    # written by other programs) on a server without an index for it (the bundled
    # FerretDB and mongo-java-server), where a sweep reads the whole input; runs
    # between take the event logger's positions alone.  0: every run sweeps.  On
    # MongoDB every run sweeps.  `zcmd aggregate --sweep` sweeps now.
    "sweep_interval": ((int, float), 60.0),
    # Seconds a run's lease on an AggDef lasts without renewal (another host may
    # take a pending run over after that).
    "agg_lease_seconds": ((int, float), 60.0),
    # Optional shared password that event senders put in a first frame (compared in
    # constant time; it travels in clear without CURVE: not authentication).
    "shared_key": ((str, type(None)), None),
    # Where `serve` logs; "-" is stderr.
    "log_file": (str, "-"),
}

ZMR_SCHEMA: dict[str, tuple[Any, Any]] = {
    "req_uri": (str, "tcp://127.0.0.1:5555"),
    "req_bind": (str, "tcp://127.0.0.1:5555"),
    "worker_uri": (str, "tcp://127.0.0.1"),
    "src_port": (int, 0),
    "sink_port": (int, 0),
    "local_workers": (int, 2),
    "processes_per_worker": (int, 0),
    "reduce_count": (int, 256),
    "map_chunk_size": (int, 5000000),
    "map_chunks_per_page": (int, 20),
    "outstanding_chunks": (int, 4),
    "max_chunk_timeout": ((int, float), 600),
    "request_greenlets": (int, 16),
    "compress": (int, 0),
    "job_root": (str, "/tmp/zmr"),
    "event_limit": (int, 100000),
    "requests_per_worker_process": (int, 256),
    "suicide_level": (int, 3145728),
}

_PATH = (str, type(None))
# CURVE authentication and encryption of every ZeroMQ socket (see zarkov.security).
# Relative paths are relative to the config file's directory.
SECURITY_SCHEMA: dict[str, tuple[Any, Any]] = {
    # The servers' key pair (a *.key_secret file): set on hosts that run the
    # router, the event logger or serve.  Turns CURVE on for every socket they bind.
    "server_key": (_PATH, None),
    # Directory of the client public keys (*.key) allowed in; needed with server_key.
    "authorized_keys": (_PATH, None),
    # The servers' public key (a *.key file), on hosts that only connect; defaults to
    # the public half of server_key.
    "server_public_key": (_PATH, None),
    # This host's client key pair (*.key_secret) for workers, zcmd aggregate,
    # ZarkovClient and zsend; defaults to server_key.
    "client_key": (_PATH, None),
    # Bind beyond loopback without keys anyway (warned about at every start).
    "allow_insecure": (bool, False),
}
SECURITY_PATHS = ("server_key", "authorized_keys", "server_public_key", "client_key")

# Nested sections and their schemas.
SECTIONS: dict[str, dict[str, tuple[Any, Any]]] = {"zmr": ZMR_SCHEMA, "security": SECURITY_SCHEMA}

# Keys whose value must be > 0 (the others may be 0 where 0 means "automatic").
POSITIVE = {
    "journal_file_size", "journal_min_files", "num_event_logs", "realtime_interval",
    "agg_lease_seconds", "zmr.reduce_count", "zmr.map_chunk_size",
    "zmr.map_chunks_per_page", "zmr.outstanding_chunks", "zmr.max_chunk_timeout",
    "zmr.request_greenlets", "zmr.event_limit", "zmr.requests_per_worker_process",
    "zmr.suicide_level",
}


class Section:
    """Attribute access to one validated section of the configuration."""

    def __init__(self, values: Mapping[str, Any]):
        self.__dict__.update(values)

    def as_dict(self) -> dict[str, Any]:
        """A plain dict copy of the section (nested sections as dicts too)."""
        return {k: (v.as_dict() if isinstance(v, Section) else v)
                for k, v in self.__dict__.items()}

    def __repr__(self) -> str:
        return f"Section({self.as_dict()!r})"


class Config(Section):
    """The whole validated configuration: top-level keys, ``zmr`` and ``security``."""

    zmr: Section
    security: Section
    source: str

    def validate(self) -> "Config":
        """Check every key against the schema; raise ConfigError naming the key."""
        data = self.as_dict()
        data.pop("source", None)
        _validate(data, self.source)
        return self


def defaults() -> dict[str, Any]:
    """The default value of every key, as a nested dict."""
    d = {k: copy.deepcopy(v[1]) for k, v in TOP_SCHEMA.items()}
    for name, schema in SECTIONS.items():
        d[name] = {k: copy.deepcopy(v[1]) for k, v in schema.items()}
    return d


def _type_name(t: Any) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             type(None): "null", list: "a list"}
    return " or ".join(names.get(x, x.__name__) for x in ts)


def _check(key: str, value: Any, expected: Any, source: str) -> None:
    types = expected if isinstance(expected, tuple) else (expected,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise ConfigError(f"{source}: key '{key}': expected {_type_name(expected)}, "
                          f"got {short_repr(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: key '{key}': must be a finite number, got {value!r}")
    if key in POSITIVE and value <= 0:
        raise ConfigError(f"{source}: key '{key}': must be greater than 0, "
                          f"got {short_repr(value)}")
    if key != "zmr.processes_per_worker" and key.endswith(("_workers", "_servers", "_port")) \
            and isinstance(value, int) and value < 0:
        raise ConfigError(f"{source}: key '{key}': must not be negative, "
                          f"got {short_repr(value)}")
    if key.endswith("_port") and isinstance(value, int) and value > 65535:
        raise ConfigError(f"{source}: key '{key}': not a TCP port, got {short_repr(value)}")
    if key in _EXTRA_CHECKS:
        problem = _EXTRA_CHECKS[key](value)
        if problem:
            raise ConfigError(f"{source}: key '{key}': {problem}")


def _bad_token(value: str | None) -> str | None:
    # Why a minimum: the token is the only thing between the network and the data.
    if value is not None and len(value) < 16:
        return "must be at least 16 characters (or null for none)"
    return None


def _bad_proxies(value: list) -> str | None:
    for item in value:
        try:
            if not isinstance(item, str):
                raise ValueError(item)
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"{short_repr(item)} is not an IP address or network"
    return None


# Checks beyond the type: each returns what is wrong, or None.
def _negative(value: float) -> str | None:
    return "must not be negative" if value < 0 else None


_EXTRA_CHECKS = {"web_token": _bad_token,
                 "web_trusted_proxies": _bad_proxies,
                 "sweep_interval": _negative}


def _key_name(key: Any) -> str:
    return first_line(str(key), 60)


def _validate(data: Mapping[str, Any], source: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the file must hold a mapping of keys, "
                          f"got {type(data).__name__}")
    for key, value in data.items():
        if key in SECTIONS:
            schema = SECTIONS[key]
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: key '{key}': expected a mapping, "
                                  f"got {short_repr(value)}")
            for zkey, zvalue in value.items():
                if zkey not in schema:
                    raise ConfigError(f"{source}: unknown key '{key}.{_key_name(zkey)}'")
                _check(f"{key}.{zkey}", zvalue, schema[zkey][0], source)
        elif key not in TOP_SCHEMA:
            raise ConfigError(f"{source}: unknown key '{_key_name(key)}'")
        else:
            _check(key, value, TOP_SCHEMA[key][0], source)
    if data.get("zmr", {}).get("processes_per_worker", 0) < 0:
        raise ConfigError(f"{source}: key 'zmr.processes_per_worker': must not be negative")


def from_dict(data: Mapping[str, Any] | None = None, source: str = "<config>") -> Config:
    """Build a validated Config from a (partial) nested dict over the defaults."""
    data = dict(data or {})
    _validate(data, source)
    merged = defaults()
    for key, value in data.items():
        if key in SECTIONS:
            merged[key].update(value)
        else:
            merged[key] = value
    _check_key_files(merged["security"], source)
    cfg = Config({k: v for k, v in merged.items() if k not in SECTIONS})
    for name in SECTIONS:
        setattr(cfg, name, Section(merged[name]))
    cfg.source = source
    return cfg


def _check_key_files(sec: dict[str, Any], source: str) -> None:
    """The ``security`` keys name readable key files of the right kind, and go together."""
    from zarkov import keys  # why here: keys imports zmq, which plain config users need not

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{source}: key 'security.{key}': {why}")

    for key, secret in (("server_key", True), ("server_public_key", False),
                        ("client_key", True)):
        if sec[key] is not None:
            try:
                keys.read_key_file(sec[key], secret=secret)
            except keys.KeyFileError as e:
                fail(key, f"{e}; make one with 'zcmd keys new <name>'")
    if sec["server_key"] is not None and sec["authorized_keys"] is None:
        fail("authorized_keys", "needed with security.server_key: the directory of the "
             "client public keys allowed in (zcmd keys authorize <file>)")
    if sec["authorized_keys"] is not None and not os.path.isdir(sec["authorized_keys"]):
        fail("authorized_keys", f"{sec['authorized_keys']}: no such directory")
    if sec["server_key"] is None:
        pairs = (("client_key", "server_public_key"), ("server_public_key", "client_key"))
        for have, need in pairs:
            if sec[have] is not None and sec[need] is None:
                fail(need, f"needed with security.{have} (a client needs the servers' "
                     f"public key and a key pair of its own)")


def _resolve_paths(data: dict[str, Any], path: str) -> None:
    """Make the relative key paths of ``data['security']`` relative to ``path``'s directory."""
    sec = data.get("security")
    if not isinstance(sec, dict):
        return
    base = os.path.dirname(os.path.abspath(path))
    for key in SECURITY_PATHS:
        value = sec.get(key)
        if isinstance(value, str) and value:
            sec[key] = os.path.join(base, os.path.expanduser(value))


def load(path: str | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load a YAML file (or only defaults when ``path`` is None), apply overrides.

    ``overrides`` maps dotted keys (``mongo_uri``, ``zmr.req_uri``) to values.
    """
    data: dict[str, Any] = {}
    source = path or "<defaults>"
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
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
        if loaded is not None:
            if not isinstance(loaded, Mapping):
                raise ConfigError(f"{path}: the file must hold a mapping of keys, "
                                  f"got {type(loaded).__name__}")
            data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in loaded.items()}
            _resolve_paths(data, path)
    for dotted, value in (overrides or {}).items():
        if "." in dotted:
            section, key = dotted.split(".", 1)
            if not isinstance(data.setdefault(section, {}), dict):
                raise ConfigError(f"{source}: key '{section}': expected a mapping, "
                                  f"got {short_repr(data[section])}")
            data[section][key] = value
        else:
            data[dotted] = value
    return from_dict(data, source)


def worker_processes(n: int) -> int:
    """Resolve a process count where 0 means one per core."""
    return n if n > 0 else (os.cpu_count() or 1)
