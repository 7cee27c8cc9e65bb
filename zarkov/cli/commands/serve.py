"""zcmd serve: the whole service in one process tree.

Event logger, router, ``zmr.local_workers`` worker processes, the real-time loop and
the web service (unless ``web_port`` is 0 or ``--no-web``), started through
:func:`zarkov.runtime.run`: in that order, stopped in reverse order on SIGTERM or
Ctrl-C (the journals flushed), or when a loop of any of them dies (exit 70).
"""
from __future__ import annotations

import argparse
from typing import Callable

from zarkov.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-eventlog", action="store_true", help="do not run the event logger")
    parser.add_argument("--no-realtime", action="store_true",
                        help="do not run the real-time aggregation loop")
    parser.add_argument("--no-web", action="store_true", help="do not run the web service")


def run(config: Config, args: argparse.Namespace) -> int:
    """Start every part, wait for SIGTERM/SIGINT, stop them in reverse order."""
    from zarkov import runtime, security
    from zarkov.eventlog.server import EventLogger
    from zarkov.realtime import RealtimeLoop
    from zarkov.web.server import WebServer, check_bind
    from zarkov.zmr.pool import WorkerPool
    from zarkov.zmr.router import Router

    # Before anything starts: a bind beyond loopback without keys exits 2 (ConfigError).
    binds = ["zmr.req_bind", "zmr.worker_uri"]
    if not args.no_eventlog:
        binds += ["bson_bind_address", "json_bind_address"]
    if not args.no_realtime:
        binds.append("publish_bind_address")
    security.check_binds(config, binds)
    web = config.web_port > 0 and not args.no_web
    if web:
        check_bind(config)
    parts: list[Callable[[], runtime.Component]] = [lambda: Router(config)]
    if config.zmr.local_workers > 0:
        parts.append(lambda: WorkerPool(config, config.zmr.local_workers))
    if not args.no_eventlog:
        parts.append(lambda: EventLogger(config))
    if not args.no_realtime:
        parts.append(lambda: RealtimeLoop(config))
    if web:
        parts.append(lambda: WebServer(config))
    return runtime.run(parts, "serve")
