"""zcmd web-server: only the web service (JSON API, dashboard, events over HTTP)."""
from __future__ import annotations

import argparse

from zarkov.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, help="listen on this port instead of web_port")


def run(config: Config, args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; exit 0 when every event taken was committed, else 3."""
    from zarkov import runtime
    from zarkov.errors import ConfigError
    from zarkov.web.server import WebServer, check_bind

    check_bind(config)
    port = args.port if args.port is not None else config.web_port
    if not 0 < port < 65536:
        raise ConfigError(f"{config.source}: key 'web_port': the web server needs a port, "
                          f"got {port}")
    return runtime.run([lambda: WebServer(config, port)], "web-server")
