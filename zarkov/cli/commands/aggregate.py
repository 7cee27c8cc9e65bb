"""zcmd aggregate <name> [full]: run one aggregation definition, exactly once.

On a terminal a live line shows the run's phase, documents and elapsed time; then
one summary line.  Not on a terminal (cron), only the summary and errors.  Exit
status: 0 done, 1 run failed (nothing changed), 2 bad definition or config (the Dask
engine refused or not installed), 3 busy.
"""
from __future__ import annotations

import argparse
import sys

from zarkov.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="name of the AggDef")
    parser.add_argument("mode", nargs="?", choices=["full"],
                        help="'full' recomputes the outputs from every document")
    parser.add_argument("--wait", action="store_true",
                        help="if another process runs this AggDef, wait for it "
                             "instead of exiting with status 3")
    parser.add_argument("--engine", choices=["router", "dask"],
                        help="run the jobs on the router or on Dask (default: zmr.engine)")
    parser.add_argument("--sweep", action="store_true",
                        help="look for events without a position (written by other "
                             "programs) now, whatever sweep_interval says")


class _LiveLine:
    """Rewrites one status line on a terminal."""

    def __init__(self, name: str, out=sys.stderr):
        self.name = name
        self.out = out
        self.width = 0

    def __call__(self, status: dict) -> None:
        line = (f"{self.name}: {status['phase']}, {status['docs']} documents, "
                f"{status['elapsed']:.1f} s")
        self.out.write("\r" + line.ljust(self.width))
        self.out.flush()
        self.width = len(line)

    def clear(self) -> None:
        if self.width:
            self.out.write("\r" + " " * self.width + "\r")
            self.out.flush()


def run(config: Config, args: argparse.Namespace) -> int:
    """One run; its errors (AggregationError: exit 1, 2 or 3) go to zcmd's handler."""
    from zarkov import aggregation
    if args.engine:
        config.zmr.engine = args.engine
    if config.zmr.engine == "dask":
        # Started before the run, so that a refused address or a missing Dask is
        # a ConfigError (exit 2) and not a failed run.
        from zarkov.dask_engine import link
        link.gateway(config)
    live = _LiveLine(args.name) if sys.stderr.isatty() else None
    try:
        result = aggregation.run(config, args.name, full=args.mode == "full",
                                 wait=args.wait, progress=live,
                                 sweep=True if args.sweep else None)
    finally:
        if live:
            live.clear()
    note = f" (finished first a run left {result.resumed})" if result.resumed else ""
    print(f"{result.name}: {result.docs} documents in {result.seconds:.2f} s"
          f"{' (full)' if result.full else ''}{note}")
    return 0
