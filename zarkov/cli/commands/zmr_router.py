"""zcmd zmr-router: run only the map-reduce router (until a signal or ``terminate``)."""
from __future__ import annotations

import argparse

from zarkov.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No arguments: everything comes from the config."""


def run(config: Config, args: argparse.Namespace) -> int:
    """Route jobs until SIGTERM/SIGINT or a ``terminate`` request."""
    from zarkov import runtime
    from zarkov.zmr.router import Router
    return runtime.run([lambda: Router(config)], "zmr-router")
