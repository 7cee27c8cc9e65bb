"""zcmd eventlog: run only the event logger until SIGTERM or SIGINT."""
import argparse

from zarkov.config import Config

SUMMARY = "run only the event logger (stop with SIGTERM or Ctrl-C; the journal is flushed)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No arguments: everything comes from the config."""


def run(config: Config, args: argparse.Namespace) -> int:
    """Serve until a signal; exit 0 when everything journaled was committed, else 3."""
    from zarkov.eventlog.server import run_until_signal
    return run_until_signal(config)
