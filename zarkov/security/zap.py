"""The server side of CURVE: the ZAP handler that admits authorised keys, and the
connection monitors that notice peers without one.

One :class:`Gatekeeper` per process (servers run under gevent).  For each ZeroMQ
context that holds a guarded socket it runs a ZAP handler greenlet on a green REP
socket at ``inproc://zeromq.zap.01``: libzmq asks it about every CURVE handshake and
it answers 200 for the servers' own key and the keys of ``security.authorized_keys``,
400 for any other (that peer's messages never reach Zarkov).  A peer with no key at
all, or one that does not know the servers' public key, fails before ZAP is asked;
a socket monitor per guarded socket sees those handshakes fail.  Both count the
refusal under the socket's name and log it with the peer's address, at most once a
second per peer and socket (so that a refused worker does not hide a refused client
of the same host).

The authorised directory is looked at on every handshake and every second.  When a
key disappears, the connections from every address that used it are closed (a
half-close, so what they already sent is still read): they reconnect and are
refused, so revocation needs no restart.  Other clients on the same address
reconnect too, which costs them nothing but a handshake.  The router's request
socket is the exception: closing it would lose replies in flight to the others, so
each request is checked instead (:meth:`Gatekeeper.admits`, the key that ZAP
attached to the message as its User-Id).
"""
from __future__ import annotations

import _socket
import collections
import logging
import os
import socket as _pysocket
import struct
import time
from typing import Any

import gevent
import zmq
import zmq.green as zgreen
from zmq.utils import z85

from zarkov import keyfiles as K
from zarkov.config import Config

log = logging.getLogger("zarkov.security")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
RELOAD_INTERVAL = 1.0   # seconds between two looks at the authorised directory
LOG_INTERVAL = 1.0      # seconds between two refusal lines about one peer
MONITOR_EVENTS = (zmq.EVENT_LISTENING | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                  | zmq.EVENT_MONITOR_STOPPED)
_REASONS: dict[int, str] = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "no CURVE key (a plain ZeroMQ peer)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "its handshake does not decrypt (wrong server "
                                           "public key?)",
}
# The C socket class, which gevent does not patch: only getpeername, getsockname and
# shutdown on a duplicate of libzmq's descriptor, none of which may wait on the hub.
_RawSocket = _socket.socket

# Guarded sockets whose messages are checked one by one rather than their
# connections closed when a key is revoked.
CHECKED_PER_MESSAGE = ("requests",)

_gate: "Gatekeeper | None" = None


def gatekeeper(config: Config) -> "Gatekeeper":
    """The process's Gatekeeper (made on first use from ``config.security``)."""
    global _gate
    sec = config.security
    # Only called for a guarded socket, which config validation gives both files.
    assert sec.server_key is not None and sec.authorized_keys is not None
    if _gate is None:
        _gate = Gatekeeper(sec.server_key, sec.authorized_keys)
    elif (_gate.key_file, _gate.directory) != (sec.server_key, sec.authorized_keys):
        raise RuntimeError("one process serves with one server key and one authorised "
                           "directory")
    return _gate


def current() -> "Gatekeeper | None":
    """The process's Gatekeeper, if a guarded socket was made."""
    return _gate


class Gatekeeper:
    """Admits authorised CURVE clients to the guarded sockets of this process."""

    def __init__(self, key_file: str, directory: str):
        self.key_file = key_file
        self.public, self.secret = K.read_key_pair(key_file)
        self.directory = directory
        self.allowed: frozenset[bytes] = frozenset()
        self.refused: collections.Counter[str] = collections.Counter()
        self._state: tuple | None = None
        self._next_look = 0.0
        self._seen: dict[bytes, set[str]] = collections.defaultdict(set)
        # peer -> (time of its last line, reasons of the refusals not logged since)
        self._logged: dict[tuple[str, str], tuple[float, collections.Counter | None]] = {}
        self._handlers: dict[int, tuple[Any, Any, gevent.Greenlet]] = {}
        self._monitors: list[_Monitor] = []
        self._reloader: gevent.Greenlet | None = None
        self._what: dict[str, str] = {}  # socket name -> what it is, for log lines
        self.reload(force=True)

    # -- sockets -------------------------------------------------------------------

    def guard(self, sock, name: str, what: str = "") -> None:
        """Make ``sock`` a CURVE server whose handshakes this gatekeeper decides;
        ``what`` says what it is in log lines."""
        self._what[name] = what or name
        ctx = sock.context
        if id(ctx) not in self._handlers:
            rep = zgreen.Socket(ctx, zmq.REP)
            rep.setsockopt(zmq.LINGER, 0)
            rep.bind(ZAP_ENDPOINT)
            self._handlers[id(ctx)] = (ctx, rep, gevent.spawn(self._serve_zap, rep))
        if self._reloader is None:
            self._reloader = gevent.spawn(self._reload_loop)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, name.encode())
        self._monitors = [m for m in self._monitors if not m.stopped]
        self._monitors.append(_Monitor(self, sock, name))

    def release(self, ctx) -> None:
        """Stop the ZAP handler and the monitors living in ``ctx``."""
        for mon in [m for m in self._monitors if m.ctx is ctx]:
            mon.stop()
            self._monitors.remove(mon)
        entry = self._handlers.pop(id(ctx), None)
        if entry is not None:
            _, rep, greenlet = entry
            greenlet.kill()
            rep.close(0)

    # -- the authorised directory ----------------------------------------------------

    def reload(self, force: bool = False) -> None:
        """Read the authorised directory again if it changed (at most every 0.1 s)."""
        now = time.monotonic()
        if not force and now < self._next_look:
            return
        self._next_look = now + 0.1
        state = K.directory_state(self.directory)
        if state == self._state and not force:
            return
        self._state = state
        new = frozenset(K.authorized_keys(self.directory).values())
        for path in K.invalid_files(self.directory):
            log.warning("security: %s holds no valid public key; ignored", path)
        removed, added = self.allowed - new, new - self.allowed
        self.allowed = new
        if not force:
            log.info("security: %d authorised client keys in %s (%d added, %d removed)",
                     len(new), self.directory, len(added), len(removed))
        if removed:
            self._drop(removed)

    def _reload_loop(self) -> None:
        while True:
            gevent.sleep(RELOAD_INTERVAL)
            try:
                self.reload()
            except Exception:
                log.exception("security: cannot read %s", self.directory)

    def _drop(self, revoked: frozenset[bytes]) -> None:
        addresses = set()
        for key in revoked:
            addresses |= self._seen.pop(key, set())
        dropped = sum(m.drop_from(addresses) for m in self._monitors
                      if m.name not in CHECKED_PER_MESSAGE)
        if dropped:
            log.info("security: closed %d connections from %s after a key was revoked",
                     dropped, ", ".join(sorted(addresses)))

    # -- ZAP ---------------------------------------------------------------------------

    def _serve_zap(self, rep) -> None:
        while True:
            msg = rep.recv_multipart()
            try:
                rep.send_multipart(self.decide(msg))
            except Exception:
                log.exception("security: ZAP request failed")
                rep.send_multipart([b"1.0", msg[1] if len(msg) > 1 else b"", b"500",
                                    b"internal error", b"", b""])

    def decide(self, msg: list[bytes]) -> list[bytes]:
        """The ZAP reply (RFC 27) to one request."""
        if len(msg) < 6 or msg[0] != b"1.0":
            return [b"1.0", msg[1] if len(msg) > 1 else b"", b"400", b"bad ZAP request",
                    b"", b""]
        _, request_id, domain, address, _, mechanism = msg[:6]
        name = domain.decode("utf-8", "replace")
        peer = address.decode("utf-8", "replace") or "a local process"
        if mechanism == b"CURVE" and len(msg) == 7 and len(msg[6]) == 32:
            key = z85.encode(msg[6])
            self.reload()
            if key == self.public or key in self.allowed:
                self._seen[key].add(peer)
                return [b"1.0", request_id, b"200", b"OK", key, b""]
            self.refuse(name, peer, f"key {key[:8].decode()}... is not authorised")
            return [b"1.0", request_id, b"400", b"key not authorised", b"", b""]
        self.refuse(name, peer, f"mechanism {mechanism.decode('ascii', 'replace')}")
        return [b"1.0", request_id, b"400", b"CURVE required", b"", b""]

    def admits(self, frame, name: str) -> bool:
        """Whether the message ``frame`` (received on socket ``name``) carries a key
        that is still authorised; a refused one is counted and logged."""
        try:
            key = frame.get("User-Id").encode()
        except (zmq.ZMQError, AttributeError):  # no metadata: not a guarded socket
            return True
        self.reload()
        if key == self.public or key in self.allowed:
            return True
        try:
            peer = frame.get("Peer-Address")
        except zmq.ZMQError:
            peer = "an unknown address"
        self.refuse(name, peer, f"key {key[:8].decode()}... was revoked")
        return False

    def refuse(self, name: str, peer: str, why: str) -> None:
        """Count one refusal and log it, at most once a second per peer and socket."""
        self.refused[name] += 1
        now = time.monotonic()
        last, hidden = self._logged.get((peer, name), (-LOG_INTERVAL, None))
        if now - last < LOG_INTERVAL:
            hidden = hidden or collections.Counter()
            hidden[why] += 1
            self._logged[(peer, name)] = (last, hidden)
            return
        more = ""
        if hidden:
            more = (f" ({sum(hidden.values())} more since the last line: "
                    + ", ".join(f"{n} x {w}" for w, n in hidden.most_common()) + ")")
        log.warning("security: refused %s on %s: %s%s", peer, self._what.get(name, name), why,
                    more)
        self._logged[(peer, name)] = (now, None)
        if len(self._logged) > 10000:  # a scan from many addresses: forget the old ones
            self._logged = {p: v for p, v in self._logged.items()
                            if now - v[0] < 60 * LOG_INTERVAL}


class _Monitor:
    """Watches one guarded socket: peers' addresses, handshakes failed before ZAP."""

    def __init__(self, gate: Gatekeeper, sock, name: str):
        self.gate = gate
        self.name = name
        self.ctx = sock.context
        self.port: int | None = None
        self.peers: dict[int, tuple | None] = {}
        self.failed: str | None = None
        self.stopped = False
        endpoint = f"inproc://zarkov-monitor-{id(self)}"
        sock.monitor(endpoint, MONITOR_EVENTS)
        self.pair = zgreen.Socket(self.ctx, zmq.PAIR)
        self.pair.setsockopt(zmq.LINGER, 0)
        self.pair.connect(endpoint)
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        try:
            while True:
                frames = self.pair.recv_multipart()
                event, value = struct.unpack("=hi", frames[0][:6])
                if event == zmq.EVENT_MONITOR_STOPPED:
                    return
                self._on(event, value, frames[1].decode("utf-8", "replace"))
        finally:
            self.stopped = True
            self.pair.close(0)

    def _on(self, event: int, value: int, endpoint: str) -> None:
        if event == zmq.EVENT_LISTENING:
            port = endpoint.rsplit(":", 1)[-1]
            self.port = int(port) if port.isdigit() else None
        elif event == zmq.EVENT_ACCEPTED:
            self.peers[value] = _peer(value, self.port)
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            self.failed = _REASONS.get(value, f"ZMTP protocol error {value:#x}")
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            # Why count it: a plain ZeroMQ peer that noticed the mismatch first hangs
            # up before the server can tell why (so do port scanners).
            self.failed = "it hung up during the handshake (no CURVE key?)"
        elif event == zmq.EVENT_DISCONNECTED:
            peer = self.peers.pop(value, None)
            if self.failed is not None:
                # Why right after: libzmq reports a failed handshake and then the
                # disconnection of that very connection, with its descriptor.
                self.gate.refuse(self.name, peer[0] if peer else "an unknown address",
                                 self.failed)
                self.failed = None

    def drop_from(self, addresses: set[str]) -> int:
        """Half-close the accepted connections from ``addresses``; how many."""
        n = 0
        for fd, peer in list(self.peers.items()):
            if peer is None or peer[0] not in addresses:
                continue
            if _peer(fd, self.port) != peer:  # gone, or the descriptor was reused
                continue
            try:
                s = _RawSocket(fileno=os.dup(fd))
            except OSError:
                continue
            try:
                s.shutdown(_pysocket.SHUT_WR)
                n += 1
            except OSError:
                pass
            finally:
                s.close()
        return n

    def stop(self) -> None:
        """Stop watching (the greenlet may not have started: close here too)."""
        self.greenlet.kill()
        self.pair.close(0)
        self.stopped = True


def _peer(fd: int, port: int | None) -> tuple | None:
    """(address, port) of the TCP peer on libzmq's descriptor ``fd``, if it still is
    a connection accepted on ``port``."""
    try:
        s = _RawSocket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if port is not None and s.getsockname()[1] != port:
            return None
        return tuple(s.getpeername()[:2])
    except (OSError, IndexError, TypeError):
        return None
    finally:
        s.close()
