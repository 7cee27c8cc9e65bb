"""Who may talk to Zarkov: loopback binds by default, CURVE on every ZeroMQ socket.

The trust model in one paragraph: a map-reduce request carries Python source that
the workers run, so whoever can send requests to the router runs code as Zarkov's
user, and whoever can send events writes to the database.  Without keys Zarkov binds
only loopback (any local user can still connect) and refuses to start on another
address (:func:`check_binds`).  With ``security.server_key`` set, every socket that a
server binds uses CURVE (authentication and encryption) and admits only clients
whose public key is in ``security.authorized_keys`` (the ZAP handler of
:mod:`zarkov.security.zap`); the servers' own key is always admitted.

Sites that create sockets call :func:`secure_server` before binding a server socket
and use :class:`ClientKeys` (from :func:`client_keys`) on client sockets; nothing
else sets CURVE options.  Socket names (the ZAP domains) are the keys of
:data:`SOCKETS`; refusals are counted per name (:func:`refusals`).
"""
from __future__ import annotations

import ipaddress
import logging
import os
from typing import Iterable, NamedTuple

import zmq
from zmq.utils import z85

from zarkov import keyfiles as K
from zarkov.config import Config, ConfigError

log = logging.getLogger("zarkov.security")

# Every server socket: name (its ZAP domain) -> what it is, for logs.
SOCKETS = {
    "requests": "the router's requests (zmr.req_bind)",
    "tasks": "the router's tasks and their replies (zmr.worker_uri)",
    "heartbeats": "the router's worker heartbeats (zmr.worker_uri)",
    "events-bson": "the BSON events (bson_bind_address)",
    "events-json": "the JSON events (json_bind_address)",
    "publish": "the agg_complete publisher (publish_bind_address)",
}

# The config keys that name bind addresses.
BIND_KEYS = ("zmr.req_bind", "zmr.worker_uri", "bson_bind_address", "json_bind_address",
             "publish_bind_address")

_warned: set[tuple[str, str]] = set()


def bind_address(config: Config, key: str) -> str:
    """The value of a bind key (``zmr.req_bind`` or a top-level key)."""
    section, _, name = key.rpartition(".")
    return getattr(getattr(config, section) if section else config, name)


def is_loopback(address: str) -> bool:
    """Whether a ZeroMQ bind address is reachable only from this host.

    ``ipc://`` and ``inproc://`` count as local; ``tcp://`` counts when its host is
    a loopback IP, ``localhost`` or the ``lo`` interface.  Anything else (``*``,
    ``0.0.0.0``, another address, an interface or host name) does not.
    """
    scheme, sep, rest = address.partition("://")
    if not sep:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    if rest.startswith("["):
        host = rest[1:rest.find("]")] if "]" in rest else rest[1:]
    else:
        host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    return host == "lo" or is_loopback_host(host)


def host_name(host: str) -> str:
    """The name or address of a Host header, without its port."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0]


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is loopback."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def http_bind_problem(config: Config, host: str, what: str) -> str | None:
    """Why an HTTP endpoint (the web service, a ``/metrics`` port) may not listen on
    ``host`` with this config, or None: beyond loopback it needs ``web_token``.

    ``what`` names the config key, for the one-line error."""
    if not is_loopback_host(host) and not config.web_token:
        return (f"{config.source}: key 'web_token': required when {what} ({host}) is "
                "beyond loopback; set a token of 16+ characters or bind 127.0.0.1")
    return None


def curve_on(config: Config) -> bool:
    """Whether this host's servers use CURVE (``security.server_key`` is set)."""
    return config.security.server_key is not None


def check_binds(config: Config, bind_keys: Iterable[str]) -> None:
    """Refuse bind addresses beyond loopback without keys; warn under allow_insecure.

    Raises ConfigError (``zcmd`` exits 2 with its one line) naming the first such
    key, unless ``security.server_key`` or ``security.allow_insecure`` is set.
    """
    exposed = [(k, bind_address(config, k)) for k in bind_keys
               if not is_loopback(bind_address(config, k))]
    if curve_on(config):
        return
    if config.security.allow_insecure:
        for key, address in exposed:
            if (key, address) not in _warned:
                _warned.add((key, address))
                log.warning("security.allow_insecure is true: %s (%s) accepts anyone who "
                            "can reach it, without keys%s", address, key,
                            ": they can run code on the workers" if key.startswith("zmr.")
                            else "")
        return
    if exposed:
        key, address = exposed[0]
        raise ConfigError(
            f"{config.source}: key '{key}': {address} is beyond loopback and CURVE keys "
            f"are off; turn them on ('zcmd keys init <dir>' prints the security section "
            f"to add; README 'Security') or set security.allow_insecure: true")


# -- clients ---------------------------------------------------------------------------

class ClientKeys(NamedTuple):
    """What a CURVE client needs: the servers' public key and a key pair of its own."""

    server: bytes   # the servers' public key, Z85
    public: bytes   # this client's public key, Z85
    secret: bytes   # this client's secret key, Z85

    @classmethod
    def load(cls, server_key: "str | bytes | os.PathLike",
             client_key: "str | os.PathLike") -> "ClientKeys":
        """From the servers' key file (or its 40-character Z85 public key) and this
        client's secret key file.  Raises keys.KeyFileError naming the file."""
        if isinstance(server_key, bytes) or (isinstance(server_key, str)
                                             and len(server_key) == 40
                                             and not os.path.exists(server_key)):
            server = server_key.encode() if isinstance(server_key, str) else server_key
            try:
                ok = len(z85.decode(server)) == 32
            except (ValueError, KeyError):
                ok = False
            if not ok:
                raise K.KeyFileError(f"{server_key!r}: not a Z85 public key nor a key file")
        else:
            server = K.read_key_file(os.fspath(server_key))[0]
        public, secret = K.read_key_pair(os.fspath(client_key))
        return cls(server, public, secret)

    def apply(self, sock) -> None:
        """Make ``sock`` (before it connects) a CURVE client with these keys."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


def client_key_files(config: Config) -> tuple[str, str] | None:
    """(servers' public key file, this host's secret key file), or None without CURVE."""
    sec = config.security
    server = sec.server_public_key or sec.server_key
    client = sec.client_key or sec.server_key
    return (server, client) if server and client else None


def client_keys(config: Config) -> ClientKeys | None:
    """This host's client keys from the config, or None when CURVE is not configured."""
    files = client_key_files(config)
    if files is None:
        return None
    try:
        return ClientKeys.load(*files)
    except K.KeyFileError as e:  # the file changed since the config was validated
        raise ConfigError(f"{config.source}: key 'security': {e}") from None


class HandshakeWatch:
    """Whether the peer of a client socket accepted its handshake (CURVE or not).

    Attach before ``connect``; :meth:`outcome` says ``"ok"``, why the handshake
    failed (no key, wrong key, key not authorised), or None while nothing is known.
    Tools use it to report a refusal instead of losing messages silently: a
    ZeroMQ client refused by its server drops what it queued.
    """

    _FAILED = {
        zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused our key (not authorised)",
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "refused the handshake (CURVE required, or "
                                             "a wrong server public key)",
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "closed the connection during the handshake "
                                              "(CURVE required, or it refused us)",
    }
    _count = 0

    def __init__(self, sock):
        from zarkov import wire
        z = wire.zmq_module()
        HandshakeWatch._count += 1
        endpoint = f"inproc://zarkov-handshake-{os.getpid()}-{HandshakeWatch._count}"
        sock.monitor(endpoint, zmq.EVENT_HANDSHAKE_SUCCEEDED | sum(self._FAILED))
        self._mon = sock.context.socket(z.PAIR)
        self._mon.setsockopt(zmq.LINGER, 0)
        self._mon.connect(endpoint)
        self._result: str | None = None
        self._closed: str | None = None

    def outcome(self, timeout: float = 0.0) -> str | None:
        """``"ok"``, a failure reason, or None; waits up to ``timeout`` s to know."""
        import struct
        import time
        deadline = time.monotonic() + timeout
        while self._result is None:
            if not self._mon.poll(max(0.0, deadline - time.monotonic()) * 1000):
                return self._closed
            event = struct.unpack("=hi", self._mon.recv_multipart()[0][:6])[0]
            if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                # Not final: ZeroMQ connects again, and the next attempt says more.
                self._closed = self._FAILED[event]
                continue
            self._result = "ok" if event == zmq.EVENT_HANDSHAKE_SUCCEEDED \
                else self._FAILED.get(event)
        return self._result

    def close(self) -> None:
        """Close the monitor (before the context is terminated)."""
        self._mon.close(0)


# -- servers ---------------------------------------------------------------------------

def secure_server(config: Config, sock, name: str) -> None:
    """Before ``sock`` binds: with keys on, make it a CURVE server guarded by ZAP.

    ``name`` (a key of :data:`SOCKETS`) names it in logs and counters.  A no-op when
    ``security.server_key`` is not set (loopback-only operation).
    """
    if not curve_on(config):
        return
    if name not in SOCKETS:
        raise ValueError(f"unknown server socket name {name!r}")
    from zarkov.security import zap
    zap.gatekeeper(config).guard(sock, name, SOCKETS[name])


def admitted(frame, name: str) -> bool:
    """Whether a message (a ``copy=False`` frame) received on the guarded socket
    ``name`` comes from a key still authorised: True without CURVE.

    For the router's requests, whose connections are not closed on revocation (a
    reply in flight to another client on the same address would be lost).
    """
    from zarkov.security import zap
    gate = zap.current()
    return gate is None or gate.admits(frame, name)


def refusals(names: Iterable[str] | None = None) -> dict[str, int]:
    """Connections refused in this process so far, by socket name (all names or ``names``)."""
    from zarkov.security import zap
    gate = zap.current()
    counts = dict(gate.refused) if gate is not None else {}
    wanted = SOCKETS if names is None else names
    return {n: counts.get(n, 0) for n in wanted}


def release(ctx) -> None:
    """Close the ZAP handler and monitors of ``ctx`` (before ``ctx.term()``)."""
    from zarkov.security import zap
    gate = zap.current()
    if gate is not None:
        gate.release(ctx)
