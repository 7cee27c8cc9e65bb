"""zcmd zmr-worker: run a pool of map-reduce worker processes (a plain process)."""
from __future__ import annotations

import argparse

from zarkov.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--processes", type=int, default=None,
                        help="number of processes (default: zmr.processes_per_worker; "
                             "0 = one per core)")


def run(config: Config, args: argparse.Namespace) -> int:
    """Keep the worker processes running until SIGTERM/SIGINT."""
    from zarkov import runtime
    from zarkov.zmr.pool import WorkerPool
    return runtime.run([lambda: WorkerPool(config, args.processes)], "zmr-worker")
