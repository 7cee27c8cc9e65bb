"""zcmd web-server: only the web service (JSON API, dashboard, events over HTTP)."""
import argparse
import logging
import sys

import gevent.event

from zarkov.config import Config

SUMMARY = ("run only the web service: JSON query API, dashboard and events over HTTP "
           "on web_bind:web_port")

log = logging.getLogger("zarkov.web")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, help="listen on this port instead of web_port")


def run(config: Config, args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; exit 0 when every event taken was committed, else 3."""
    from zarkov.web.app import bind_problem
    from zarkov.web.server import WebServer
    from zarkov.zmr.signals import on_stop_signals

    problem = bind_problem(config)
    port = args.port if args.port is not None else config.web_port
    if not problem and not 0 < port < 65536:
        problem = f"{config.source}: key 'web_port': the web server needs a port, got {port}"
    if problem:
        print(f"zcmd: {problem}", file=sys.stderr)
        return 2
    try:
        server = WebServer(config, port).start()
    except OSError as e:
        print(f"zcmd: {e.strerror or e}", file=sys.stderr)
        return 1
    stop = gevent.event.Event()
    on_stop_signals(stop.set)
    stop.wait()
    log.info("web: stopping")
    return 0 if server.stop() else 3
