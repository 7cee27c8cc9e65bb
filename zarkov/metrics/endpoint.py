"""``/metrics`` of a process run apart (event logger, router, worker pool).

:class:`MetricsServer` serves the families a callback builds at each scrape, over a
small threaded HTTP server (green threads under gevent), with the web service's
access rules: beyond loopback only with ``web_token`` set, and then only to a request
that carries it as a bearer token; without a token, only requests addressed to a
loopback host name (no DNS rebinding).
"""
from __future__ import annotations

import hmac
import logging
import threading
from typing import Any, Callable, Iterable, Optional
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from zarkov.config import Config
from zarkov.errors import ConfigError
from zarkov.metrics.families import build_info
from zarkov.runtime import StartError, loops
from zarkov.security import host_name, http_bind_problem, is_loopback_host

log = logging.getLogger("zarkov.metrics")

Families = Callable[[], Iterable[Any]]


class Callback(Collector):
    """A collector whose families ``build()`` makes at each scrape (a failure is logged
    and the scrape shows what else there is)."""

    def __init__(self, build: Families, what: str):
        self.build = build
        self.what = what

    def collect(self) -> Iterable[Any]:
        """The families of this scrape."""
        yield from build_info()
        try:
            families = list(self.build())
        except Exception:
            log.exception("%s: building the metrics failed", self.what)
            return
        yield from families


def registry_of(build: Families, what: str) -> CollectorRegistry:
    """A registry holding only ``build``'s families (not the process-wide default)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Callback(build, what))
    return registry


def guarded(app: Callable, token: Optional[str]) -> Callable:
    """``app`` at ``/metrics`` only, behind the token (or loopback host names)."""
    def guard(environ: dict, start_response: Callable) -> Iterable[bytes]:
        def refuse(status: str, why: str, extra: Optional[list] = None) -> list[bytes]:
            start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                     *(extra or [])])
            return [why.encode() + b"\n"]
        if environ.get("PATH_INFO") != "/metrics":
            return refuse("404 Not Found", "only /metrics is served here")
        if token:
            auth = environ.get("HTTP_AUTHORIZATION", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                return refuse("401 Unauthorized", "a bearer token is required "
                              "(Authorization: Bearer <web_token>)",
                              [("WWW-Authenticate", 'Bearer realm="zarkov"')])
        else:
            host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "")
            if not is_loopback_host(host_name(host)):
                return refuse("403 Forbidden", f"host {host!r}: without web_token only "
                              "loopback host names are served")
        return app(environ, start_response)
    return guard


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


class MetricsServer:
    """Serves ``/metrics`` on ``config.metrics.bind``:``port`` while started."""

    def __init__(self, config: Config, port: int, what: str, build: Families):
        self.config = config
        self.port = port
        self.what = what
        self.app = guarded(make_wsgi_app(registry_of(build, what)), config.web_token)
        self._server: Optional[ThreadingWSGIServer] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    def start(self) -> "MetricsServer":
        """Listen (StartError when the port is taken), then serve in a thread."""
        host = self.config.metrics.bind
        problem = http_bind_problem(self.config, host, "metrics.bind")
        if problem:
            raise ConfigError(problem)
        try:
            self._server = make_server(host, self.port, self.app, ThreadingWSGIServer,
                                       handler_class=_Quiet)
        except OSError as e:
            raise StartError(f"{self.what}: cannot serve /metrics on {host}:{self.port}: "
                             f"{e.strerror or e}") from None
        self.port = self._server.server_port
        # Watched: should the serving loop end while the process lives, the process
        # stops (exit 70) rather than go on without its metrics.
        self._thread = loops.start_thread(f"{self.what}: metrics loop",
                                          self._server.serve_forever,
                                          expected_end=lambda: self._stopping)
        log.info("%s: Prometheus metrics at http://%s:%d/metrics", self.what, host, self.port)
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop serving."""
        self._stopping = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout)
        return True
