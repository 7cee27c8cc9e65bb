"""zcmd check-config: load and validate the configuration, then exit."""
from __future__ import annotations

import argparse

from zarkov.config import Config

# Values that are passwords: printed as "***" so that the output can be shared.
SECRETS = ("shared_key", "web_token")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")


def run(config: Config, args: argparse.Namespace) -> int:
    import yaml
    if not args.quiet:
        data = config.as_dict()
        for key in SECRETS:
            if data.get(key) is not None:
                data[key] = "***"
        print(f"# {data.pop('source')}: valid")
        print(yaml.safe_dump(data, sort_keys=True), end="")
    return 0
