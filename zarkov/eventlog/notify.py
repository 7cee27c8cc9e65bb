"""News of committed events: from the committers to whoever listens (the real-time loop).

A :class:`~zarkov.eventlog.committer.Committer` calls :func:`committed` after each
insert that stored events.  Within one process the news goes straight to the
functions registered with :func:`listen` (``zcmd serve``'s real-time loop).  The
event logger's child processes (``num_event_servers`` > 1) have no listener of their
own: a :class:`Forwarder` sends each piece of news to the parent over a PUSH socket,
where a :class:`Receiver` hands it to the parent's listeners.

News is a hint, never a duty: a listener that is not there, or a message dropped
because the parent is slow, only means the loop runs at its next
``realtime_interval`` instead of at once.  Nothing here ever raises into a committer.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import bson
import gevent

from zarkov import wire
from zarkov.runtime import loops

log = logging.getLogger("zarkov.eventlog.notify")

Listener = Callable[[str, int], None]

_listeners: list[Listener] = []


def listen(fn: Listener) -> Callable[[], None]:
    """Call ``fn(collection, n)`` whenever ``n`` events were committed to ``collection``
    in this process (or reported by a child); returns the function that stops it."""
    _listeners.append(fn)

    def stop() -> None:
        if fn in _listeners:
            _listeners.remove(fn)
    return stop


def committed(collection: str, n: int) -> None:
    """Tell the listeners that ``n`` events were stored in ``collection``."""
    for fn in list(_listeners):
        try:
            fn(collection, n)
        except Exception:
            log.exception("a listener of committed events failed")


class Forwarder:
    """In an event-server child: sends each :func:`committed` to the parent's Receiver."""

    def __init__(self, uri: str):
        z = wire.zmq_module()
        self._z = z
        self.sock = wire.context().socket(z.PUSH)
        self.sock.setsockopt(z.LINGER, 0)
        # A few messages at most: news piling up is worth nothing.
        self.sock.setsockopt(z.SNDHWM, 16)
        self.sock.connect(uri)
        self._stop = listen(self.send)

    def send(self, collection: str, n: int) -> None:
        """Send one piece of news, or drop it when the parent does not keep up."""
        try:
            self.sock.send(bson.encode({"c": collection, "n": n}), self._z.NOBLOCK)
        except self._z.ZMQError:
            pass

    def close(self) -> None:
        """Stop forwarding."""
        self._stop()
        self.sock.close(0)


class Receiver:
    """In the event logger's parent: news from its children, handed to :func:`committed`."""

    def __init__(self, uri: str):
        """Bind ``uri``: an ``ipc://`` path in the event logger's private directory,
        so that no other local user can send news (it would only cause early runs)."""
        z = wire.zmq_module()
        self.sock = wire.context().socket(z.PULL)
        self.sock.setsockopt(z.LINGER, 0)
        self.sock.bind(uri)
        self.uri = uri
        self.errors = loops.Errors(log)
        self._greenlet = loops.spawn("event logger: news of commits", self._loop)

    def _loop(self) -> None:
        while True:
            try:
                msg = bson.decode(self.sock.recv())
                collection = msg.get("c")
                n: Any = msg.get("n")
                if type(collection) is str and wire.is_int(n):
                    committed(collection, n)
            except Exception:  # noqa: BLE001 - one bad message must not stop the news
                self.errors.record("news of commits")
                gevent.sleep(0.1)  # why: no busy loop should the error persist

    def close(self) -> None:
        """Stop receiving."""
        self._greenlet.kill()
        self.sock.close(0)
