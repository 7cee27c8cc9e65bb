"""BSON documents over ZeroMQ: encoding, request/reply with time limits.

Processes that run under gevent (``zcmd`` after ``monkey.patch_all()``) must use
``zmq.green``; plain processes (the map-reduce worker processes) use ``zmq``.
:func:`zmq_module` picks the right one, so callers never import zmq directly for
sockets that they block on.
"""
from __future__ import annotations

from typing import Any, Mapping

import bson
from bson.codec_options import CodecOptions
import zmq

# tz_aware=False: datetimes come back naive UTC, as pymongo returns them by default.
CODEC = CodecOptions(tz_aware=False)


class WireError(Exception):
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
    except Exception as e:  # bson raises InvalidBSON and friends
        raise WireError(f"not a BSON document: {e}") from None


def req_socket(uri: str, ctx=None):
    """A REQ socket connected to ``uri`` that may send again after a lost reply."""
    z = zmq_module()
    sock = (ctx or context()).socket(z.REQ)
    sock.setsockopt(z.LINGER, 0)
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
    sock.send(encode(doc))
    if not sock.poll((timeout + held) * 1000, z.POLLIN):
        raise RouterTimeout(f"no answer from {uri} (zmr.req_uri) within {timeout:g} s")
    return decode(sock.recv())


def request(uri: str, doc: Mapping[str, Any], timeout: float = 10.0) -> dict:
    """One request on a fresh REQ socket; see :func:`call`."""
    sock = req_socket(uri)
    try:
        return call(sock, doc, timeout, uri)
    finally:
        sock.close(0)
