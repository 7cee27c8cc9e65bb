"""BSON documents over ZeroMQ: encoding, request/reply with time limits.

Processes that run under gevent (``zcmd`` after ``monkey.patch_all()``) must use
``zmq.green``; plain processes (the map-reduce worker processes) use ``zmq``.
:func:`zmq_module` picks the right one, so callers never import zmq directly for
sockets that they block on.

Where the router uses CURVE, pass ``keys`` (a :class:`zarkov.security.ClientKeys`,
e.g. ``security.client_keys(config)``) to :func:`req_socket` and :func:`request`.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import bson
import zmq
from bson.codec_options import CodecOptions

from zarkov.errors import ZarkovError

# tz_aware=False: datetimes come back naive UTC, as pymongo returns them by default.
CODEC: CodecOptions = CodecOptions(tz_aware=False)


class WireError(ZarkovError):
    """A peer answered with something that is not a well-formed reply."""


class RouterTimeout(WireError):
    """No reply within the time limit; the message names the URI."""


def zmq_module():
    """``zmq.green`` when gevent has patched this process, else ``zmq``."""
    try:
        from gevent import monkey
        if monkey.is_module_patched("socket"):
            import zmq.green as zgreen
            return zgreen
    except ImportError:  # pragma: no cover - gevent is a dependency
        pass
    return zmq


def context():
    """The process-wide ZeroMQ context of the right flavour."""
    return zmq_module().Context.instance()


def encode(doc: Mapping[str, Any]) -> bytes:
    """One document as BSON bytes."""
    return bson.encode(doc)


def decode(data: bytes) -> dict:
    """BSON bytes as a dict; raises WireError when the bytes are not one document."""
    try:
        return bson.decode(data, CODEC)
    except Exception as e:  # noqa: BLE001 - bson raises InvalidBSON and friends
        raise WireError(f"not a BSON document: {e}") from None


def is_int(value: Any) -> bool:
    """Whether ``value`` is a BSON integer: an int32 or an Int64 (``bson.Int64``, an
    int subclass, which a client's driver may send for any integer), never a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def split_request(frames: list[bytes]) -> tuple[list[bytes], bytes]:
    """A request as a ROUTER socket receives it: (envelope, body).  REQ peers put an
    empty delimiter (after a correlation id) before the body."""
    try:
        split = frames.index(b"") + 1
    except ValueError:
        split = 1
    return frames[:split], frames[split] if split < len(frames) else b""


def encode_reply(doc: Mapping[str, Any]) -> bytes:
    """A reply's BSON; one that cannot be encoded (a basic job's result, say) becomes
    an ``error`` reply, so that every request still gets its one answer."""
    try:
        return bson.encode(doc)
    except Exception as e:  # noqa: BLE001 - any value a job may hand back
        return bson.encode({"error": f"reply not BSON-encodable: {e}"})


@contextmanager
def pooled_socket(idle: list, make: Callable[[], Any]) -> Iterator[Any]:
    """A REQ socket taken from ``idle`` (or ``make()``), put back after a use that
    ended cleanly and closed after one that did not (a REQ socket left waiting for a
    reply cannot send again)."""
    sock = idle.pop() if idle else make()
    ok = False
    try:
        yield sock
        ok = True
    finally:
        if ok:
            idle.append(sock)
        else:
            sock.close(0)


def req_socket(uri: str, ctx=None, keys=None):
    """A REQ socket connected to ``uri`` that may send again after a lost reply.

    ``keys`` (:class:`zarkov.security.ClientKeys`) makes it a CURVE client.
    """
    z = zmq_module()
    sock = (ctx or context()).socket(z.REQ)
    sock.setsockopt(z.LINGER, 0)
    if keys is not None:
        keys.apply(sock)
    # Relaxed + correlate: after a time-out the socket can send a new request, and a
    # late reply to the old one is dropped instead of being read as the new answer.
    sock.setsockopt(z.REQ_RELAXED, 1)
    sock.setsockopt(z.REQ_CORRELATE, 1)
    sock.connect(uri)
    # Plain zmq sockets read any attribute assignment as a socket option; bypass
    # that to remember the URI for error messages.
    object.__setattr__(sock, "zarkov_uri", uri)
    return sock


def call(sock, doc: Mapping[str, Any], timeout: float, uri: str | None = None,
         held: float = 0.0) -> dict:
    """Send ``doc`` on a REQ socket and return the decoded reply.

    Raises RouterTimeout (naming the URI) when no reply comes within ``timeout``
    seconds (plus ``held``: how long the peer may hold the reply on purpose, as a
    long poll does), and WireError when the reply is not BSON.  A reply that carries
    ``error`` is returned as it is: what to do with it is the caller's business.
    """
    z = zmq_module()
    uri = uri or getattr(sock, "zarkov_uri", "the router")
    deadline = time.monotonic() + timeout
    data = encode(doc)
    # Why poll and never block in send: a REQ socket with no connection (the router
    # refused our key, or is not there) would block there for ever.
    while True:
        if not sock.poll(max(0.0, deadline - time.monotonic()) * 1000, z.POLLOUT):
            raise RouterTimeout(f"no connection to {uri} (zmr.req_uri) within "
                                f"{timeout:g} s{_REFUSED_HINT if _has_keys(sock) else ''}")
        try:
            sock.send(data, z.NOBLOCK)
            break
        except z.Again:  # the connection went away between poll and send
            continue
    if not sock.poll((max(0.0, deadline - time.monotonic()) + held) * 1000, z.POLLIN):
        raise RouterTimeout(f"no answer from {uri} (zmr.req_uri) within {timeout:g} s"
                            f"{_REFUSED_HINT if _has_keys(sock) else ''}")
    return decode(sock.recv())


_REFUSED_HINT = " (or it refused this host's CURVE key: see security.client_key)"


def _has_keys(sock) -> bool:
    try:
        return bool(sock.getsockopt(zmq.CURVE_SERVERKEY))
    except zmq.ZMQError:
        return False


def request(uri: str, doc: Mapping[str, Any], timeout: float = 10.0, keys=None) -> dict:
    """One request on a fresh REQ socket (a CURVE client with ``keys``); see :func:`call`."""
    sock = req_socket(uri, keys=keys)
    try:
        return call(sock, doc, timeout, uri)
    finally:
        sock.close(0)
