"""zcmd zmr-clean: remove the router's temporary job files under zmr.job_root."""
from __future__ import annotations

import argparse

from zarkov.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing")


def run(config: Config, args: argparse.Namespace) -> int:
    from zarkov.zmr.spill import clean
    removed = clean(config.zmr.job_root)
    if not args.quiet:
        print(f"removed {len(removed)} job director{'y' if len(removed) == 1 else 'ies'} "
              f"under {config.zmr.job_root}")
    return 0
