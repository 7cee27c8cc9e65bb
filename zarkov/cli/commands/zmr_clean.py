"""zcmd zmr-clean: remove the router's temporary job files under zmr.job_root."""
import argparse

from zarkov.config import Config
from zarkov.zmr.spill import clean

SUMMARY = "remove the router's temporary job files (zmr.job_root)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing")


def run(config: Config, args: argparse.Namespace) -> int:
    removed = clean(config.zmr.job_root)
    if not args.quiet:
        print(f"removed {len(removed)} job director{'y' if len(removed) == 1 else 'ies'} "
              f"under {config.zmr.job_root}")
    return 0
