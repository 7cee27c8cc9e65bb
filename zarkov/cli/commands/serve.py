"""zcmd serve: the whole service in one process tree."""
import argparse
import logging
import sys

import gevent.event

from zarkov import security, supervise
from zarkov.config import Config

SUMMARY = ("run the whole service: event logger, map-reduce router, "
           "zmr.local_workers worker processes, the real-time aggregation loop "
           "and the web service (when web_port is not 0)")

log = logging.getLogger("zarkov.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-eventlog", action="store_true", help="do not run the event logger")
    parser.add_argument("--no-realtime", action="store_true",
                        help="do not run the real-time aggregation loop")
    parser.add_argument("--no-web", action="store_true", help="do not run the web service")


def run(config: Config, args: argparse.Namespace) -> int:
    """Start every part, wait for SIGTERM/SIGINT, stop them in reverse order."""
    from zarkov.eventlog.server import EventLogger
    from zarkov.realtime import RealtimeLoop
    from zarkov.web.app import bind_problem
    from zarkov.web.server import WebServer
    from zarkov.zmr.pool import WorkerPool
    from zarkov.zmr.router import Router
    from zarkov.zmr.signals import on_stop_signals

    # Before anything starts: a bind beyond loopback without keys exits 2 (ConfigError).
    binds = ["zmr.req_bind", "zmr.worker_uri"]
    if not args.no_eventlog:
        binds += ["bson_bind_address", "json_bind_address"]
    if not args.no_realtime:
        binds.append("publish_bind_address")
    security.check_binds(config, binds)
    web = config.web_port > 0 and not args.no_web
    if web and bind_problem(config):
        print(f"zcmd: {bind_problem(config)}", file=sys.stderr)
        return 2
    stop = gevent.event.Event()
    on_stop_signals(stop.set)
    supervise.on_death(stop.set)  # a dead loop in any part stops serve, status 70
    started = []
    try:
        started.append(Router(config).start())
        if config.zmr.local_workers > 0:
            started.append(WorkerPool(config, config.zmr.local_workers).start())
        if not args.no_eventlog:
            started.append(EventLogger(config).start())
        if not args.no_realtime:
            started.append(RealtimeLoop(config).start())
        if web:
            started.append(WebServer(config).start())
    except Exception as e:  # noqa: BLE001 - a bind error, say which and stop the rest
        log.error("serve: cannot start: %s", e)
        stop.set()
        code = 1
    else:
        log.info("serve: running (%s); stop with Ctrl-C or SIGTERM",
                 ", ".join(type(s).__name__ for s in started))
        code = 0
    stop.wait()
    log.info("serve: stopping")
    for part in reversed(started):
        try:
            part.stop()
        except Exception:  # noqa: BLE001 - stop the others anyway
            log.exception("serve: error while stopping %s", type(part).__name__)
    return code
