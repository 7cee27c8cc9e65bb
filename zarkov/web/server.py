"""The web service's process part: gevent's WSGI server, the HTTP intake, the rate sampler.

``WebServer(config).start()`` returns at once, serving in greenlets (so ``zcmd
serve`` runs it beside the other parts); ``stop()`` stops taking requests, then
commits what the intake journaled.  A bind beyond loopback without ``web_token`` is
refused (:func:`check_bind`, which ``start`` calls too: commands call it before
starting anything).
"""
from __future__ import annotations

import logging
from typing import Optional

import gevent.pool
from gevent.pywsgi import LoggingLogAdapter, WSGIServer

from zarkov.config import Config
from zarkov.errors import ConfigError
from zarkov.runtime import StartError
from zarkov.web.app import bind_problem, create_app
from zarkov.web.intake import WebIntake
from zarkov.web.rate import EventRate

MAX_CONNECTIONS = 256   # requests served at once; more wait in the listen backlog

log = logging.getLogger("zarkov.web")


def check_bind(config: Config) -> None:
    """Raise ConfigError when the web service may not listen where the config says."""
    problem = bind_problem(config)
    if problem:
        raise ConfigError(problem)


class WebServer:
    """The web service of one process."""

    def __init__(self, config: Config, port: Optional[int] = None):
        self.config = config
        self.port = port or config.web_port
        self.intake: Optional[WebIntake] = None
        self.rate: Optional[EventRate] = None
        self.server: Optional[WSGIServer] = None

    @property
    def url(self) -> str:
        """Where a browser finds the dashboard."""
        host = self.config.web_bind
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    def start(self) -> "WebServer":
        """Listen (raises OSError when the port is taken), then serve in greenlets."""
        cfg = self.config
        check_bind(cfg)
        server = WSGIServer((cfg.web_bind, self.port), None,
                            spawn=gevent.pool.Pool(MAX_CONNECTIONS),
                            log=LoggingLogAdapter(logging.getLogger("zarkov.web.access"),
                                                  logging.DEBUG),
                            error_log=LoggingLogAdapter(log, logging.ERROR))
        try:
            server.init_socket()  # bind now: a taken port fails before anything else starts
        except OSError as e:
            raise StartError(f"web service: cannot listen on {cfg.web_bind}:{self.port}: "
                             f"{e.strerror or e}") from None
        self.intake = WebIntake(cfg, self.port).start()
        self.rate = EventRate(cfg.journal).start()
        server.application = create_app(cfg, self.intake, self.rate)
        server.start()
        self.server = server
        note = "" if cfg.web_token else " (no web_token: loopback host names only)"
        log.info("web: dashboard and JSON API at %s%s; events at %sevents and %sbeacon.gif",
                 self.url, note, self.url, self.url)
        return self

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop serving, then commit what the intake journaled; True when all was."""
        if self.server is not None:
            self.server.stop(timeout=min(5.0, timeout))
            self.server = None
        if self.rate is not None:
            self.rate.stop()
        ok = True
        if self.intake is not None:
            ok = self.intake.stop(timeout)
            self.intake = None
        return ok
