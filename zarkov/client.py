"""ZarkovClient: how applications send events to the event logger.

Fire-and-forget: an event is one BSON document pushed on a ZeroMQ PUSH socket
connected to the logger's ``bson_uri``; nothing waits for an answer.  ZeroMQ queues
up to ``hwm`` events while the logger is unreachable; past that, by default, an event
is dropped (counted in ``dropped``) rather than stalling the application — pass
``send_timeout`` (seconds, ``None`` = wait for ever) to wait for room instead.
Works in plain processes and under gevent (``zmq.green`` when gevent has patched).

When the event logger uses CURVE, give the servers' public key and this client's
key pair (files made by ``zcmd keys new``), or build the client from a config::

    client = ZarkovClient("tcp://events.example:6543", server_key="keys/server.key",
                          client_key="keys/app1.key_secret")
    client = ZarkovClient.from_config(config)   # bson_uri, shared_key, keys

``shared_key`` is the old shared password frame: it travels in clear unless CURVE
is on, so it is no authentication by itself.

>>> client = ZarkovClient("tcp://127.0.0.1:6543")
>>> client.event("download", {"user": "bob", "project": "zarkov"}, extra={"file": "a.tgz"})
>>> client.event_noval("raw", {"user": "bob"}, [1, 2])     # the original call form
>>> client.event_noval({"type": "raw", "anything": [1, 2]})
>>> client.close()
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Mapping

import bson

from zarkov import wire
from zarkov.security import ClientKeys, HandshakeWatch, client_keys


class ZarkovClient:
    """A PUSH socket to the event logger; close it (or use ``with``) to flush.

    ``server_key`` (the servers' public key file, or its Z85 text) and ``client_key``
    (this client's secret key file) make it a CURVE client; so does ``keys``.
    ``watch_handshake`` lets :meth:`handshake` say whether the logger let us in.
    """

    def __init__(self, uri: str, shared_key: str | bytes | None = None, hwm: int = 100000,
                 send_timeout: float | None = 0.0, linger: float = 5.0,
                 server_key: str | bytes | None = None, client_key: str | None = None,
                 keys: ClientKeys | None = None, watch_handshake: bool = False):
        self.uri = uri
        self.key = shared_key.encode() if isinstance(shared_key, str) else shared_key
        self.linger = linger
        self.dropped = 0
        self.sent = 0
        if keys is None and (server_key is not None or client_key is not None):
            if server_key is None or client_key is None:
                raise ValueError("server_key and client_key go together")
            keys = ClientKeys.load(server_key, client_key)
        self._z = wire.zmq_module()
        self._sock = wire.context().socket(self._z.PUSH)
        self._sock.setsockopt(self._z.SNDHWM, hwm)
        if keys is not None:
            keys.apply(self._sock)
        self._flags = 0
        if send_timeout is None:
            self._sock.setsockopt(self._z.SNDTIMEO, -1)
        elif send_timeout <= 0:
            self._flags = self._z.NOBLOCK
        else:
            self._sock.setsockopt(self._z.SNDTIMEO, int(send_timeout * 1000))
        self._watch = HandshakeWatch(self._sock) if watch_handshake else None
        self._sock.connect(uri)

    @classmethod
    def from_config(cls, config, **kw: Any) -> "ZarkovClient":
        """A client of the event logger that ``config`` describes (``bson_uri``,
        ``shared_key`` and the CURVE keys of its ``security`` section)."""
        kw.setdefault("shared_key", config.shared_key)
        return cls(config.bson_uri, keys=client_keys(config), **kw)

    def event(self, type: str, context: Mapping[str, Any],
              extra: Any = None, timestamp: dt.datetime | None = None) -> bool:
        """Send one event; the logger fills ``timestamp`` with the receive time when None.

        ``type``, ``context``, ``extra`` are the event's fields (SPEC 3), positional or
        keyword.  Returns False when the event was dropped (queue full past the send
        timeout).
        """
        doc: dict[str, Any] = {"type": type, "context": context}
        if extra is not None:
            doc["extra"] = extra
        if timestamp is not None:
            doc["timestamp"] = timestamp
        return self.send_raw(bson.encode(doc))

    def event_noval(self, type: str | Mapping[str, Any] | None = None, context: Any = None,
                    extra: Any = None, **fields: Any) -> bool:
        """Send a document that the logger stores as sent, without validation.

        Two call forms: the original client's ``event_noval(type, context,
        extra=None)`` (positional or keyword; ``extra`` left out when None), and a
        whole document, ``event_noval(doc)``, keyword fields, or both (keywords win).
        """
        out: dict[str, Any] = {"$command": "event_noval"}
        if isinstance(type, Mapping):
            if context is not None or extra is not None:
                raise TypeError("event_noval(doc) takes no context or extra: put them "
                                "in the document")
            out.update(type)
        else:
            for key, value in (("type", type), ("context", context), ("extra", extra)):
                if value is not None:
                    out[key] = value
        out.update(fields)
        return self.send_raw(bson.encode(out))

    def send_raw(self, data: bytes) -> bool:
        """Send one already encoded BSON message; False when it was dropped."""
        try:
            if self.key is not None:
                self._sock.send_multipart([self.key, data], self._flags)
            else:
                self._sock.send(data, self._flags)
        except self._z.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def handshake(self, timeout: float = 0.0) -> str | None:
        """``"ok"`` once the logger accepted the connection, why it refused it (events
        queued are then lost), or None while unknown; needs ``watch_handshake``."""
        return self._watch.outcome(timeout) if self._watch is not None else None

    def close(self, linger: float | None = None) -> None:
        """Close the socket, waiting up to ``linger`` seconds to hand queued events over."""
        if self._watch is not None:
            self._watch.close()
        wait = self.linger if linger is None else linger
        self._sock.close(linger=-1 if wait < 0 else int(wait * 1000))

    def __enter__(self) -> "ZarkovClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
