"""zcmd zmr-worker: run a pool of map-reduce worker processes."""
import argparse

from zarkov import supervise
from zarkov.config import Config
from zarkov.zmr.pool import WorkerPool
from zarkov.zmr.signals import on_stop_signals

SUMMARY = "run zmr.processes_per_worker worker processes connected to zmr.req_uri"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--processes", type=int, default=None,
                        help="number of processes (default: zmr.processes_per_worker; "
                             "0 = one per core)")


def run(config: Config, args: argparse.Namespace) -> int:
    pool = WorkerPool(config, args.processes).start()
    on_stop_signals(pool.stop)
    supervise.on_death(pool.stop)
    pool.run_forever()
    return 0
