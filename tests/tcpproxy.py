"""A TCP proxy in front of the database that can cut one connection on demand.

Real failures, not mocks: the event logger talks to the database through it, and
``drop_next(marker)`` closes the connection that next sends bytes holding
``marker`` (say, an ``insert`` command) instead of forwarding them — the server
never sees them, the client sees its connection closed, and ``ping`` on a new
connection still works.
"""
from __future__ import annotations

import socket
import threading


class TcpProxy:
    """Forward 127.0.0.1:<port> to ``(host, port)`` with plain threads."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.dropped = 0
        self._marker: bytes | None = None
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._closing = False

    @property
    def uri(self) -> str:
        """A MongoDB URI that goes through the proxy (retryable writes off: pymongo would
        retry a cut insert itself on a replica set, and the test is about Zarkov)."""
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true&retryWrites=false"

    def start(self) -> "TcpProxy":
        """Accept connections in a daemon thread."""
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def drop_next(self, marker: bytes) -> None:
        """Cut the next connection whose client sends bytes holding ``marker``."""
        with self._lock:
            self._marker = marker

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._open += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_client:
                    with self._lock:
                        cut = self._marker is not None and self._marker in data
                        if cut:
                            self._marker = None
                            self.dropped += 1
                    if cut:
                        break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._closing = True
        self.listener.close()
        with self._lock:
            for s in self._open:
                try:
                    s.close()
                except OSError:
                    pass
