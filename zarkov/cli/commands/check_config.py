"""zcmd check-config: load and validate the configuration, then exit."""
import argparse

import yaml

from zarkov.config import Config

SUMMARY = "load and validate the config, print it, and exit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")


def run(config: Config, args: argparse.Namespace) -> int:
    if not args.quiet:
        data = config.as_dict()
        print(f"# {data.pop('source')}: valid")
        print(yaml.safe_dump(data, sort_keys=True), end="")
    return 0
