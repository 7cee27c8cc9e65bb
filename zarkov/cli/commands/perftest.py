"""zcmd perftest: send synthetic events to an event logger, for load tests."""
from __future__ import annotations

import argparse

from zarkov.config import Config
from zarkov.errors import BadInput


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``<uri> <n> <concurrency> <rate>``."""
    parser.add_argument("uri", help="the event logger's BSON address (bson_uri)")
    parser.add_argument("n", type=int, help="how many events")
    parser.add_argument("concurrency", type=int, help="how many sockets send at once")
    parser.add_argument("rate", type=float,
                        help="events per second in all; 0 = as fast as possible")


def run(config: Config, args: argparse.Namespace) -> int:
    """Send the events (with the configured shared key and keys) and print the rates."""
    from zarkov import security
    from zarkov.eventlog import perftest
    if args.n < 0 or args.concurrency < 1 or args.rate < 0:
        raise BadInput("n must be >= 0, concurrency >= 1 and rate >= 0")
    perftest.run(args.uri, args.n, args.concurrency, args.rate, config.shared_key,
                 keys=security.client_keys(config))
    return 0
