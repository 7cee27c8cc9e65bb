"""zcmd eventlog: run only the event logger until SIGTERM or SIGINT."""
from __future__ import annotations

import argparse

from zarkov.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No arguments: everything comes from the config."""


def run(config: Config, args: argparse.Namespace) -> int:
    """Serve until a signal; exit 0 when everything journaled was committed, else 3."""
    from zarkov import runtime
    from zarkov.eventlog.server import EventLogger
    return runtime.run([lambda: EventLogger(config)], "eventlog")
