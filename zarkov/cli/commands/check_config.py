"""zcmd check-config: load and validate the configuration, then exit."""
from __future__ import annotations

import argparse

from zarkov.config import Config

# Values that are passwords: printed as "***" so that the output can be shared.
SECRETS = ("shared_key", "web_token")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")


def masked_uri(uri: str) -> str:
    """``uri`` with the password of its user info replaced by ``***``."""
    scheme, sep, rest = uri.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return uri
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hosts}"


def run(config: Config, args: argparse.Namespace) -> int:
    import yaml
    if not args.quiet:
        data = config.as_dict()
        for key in SECRETS:
            if data.get(key) is not None:
                data[key] = "***"
        data["mongo_uri"] = masked_uri(data["mongo_uri"])
        print(f"# {data.pop('source')}: valid")
        print(yaml.safe_dump(data, sort_keys=True), end="")
    return 0
