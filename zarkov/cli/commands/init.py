"""zcmd init: drop the Zarkov database (every event and aggregate).

On a terminal it asks for confirmation; ``--force`` skips it.  Not on a terminal and
without ``--force`` it refuses (exit 2): a script must say it means it.
"""
from __future__ import annotations

import argparse
import sys

from zarkov.config import Config
from zarkov.errors import BadInput, ZarkovError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="do not ask for confirmation")


def run(config: Config, args: argparse.Namespace) -> int:
    import pymongo
    where = f"database '{config.mongo_database}' on {config.mongo_uri}"
    if not args.force:
        if not sys.stdin.isatty():
            raise BadInput(f"refusing to drop {where} without --force (not on a terminal)")
        answer = input(f"Drop {where}, with every event and aggregate? "
                       f"Type the database name to confirm: ")
        if answer.strip() != config.mongo_database:
            raise ZarkovError("not confirmed; nothing dropped")
    client: pymongo.MongoClient = pymongo.MongoClient(config.mongo_uri,
                                                      serverSelectionTimeoutMS=10000)
    try:
        client.drop_database(config.mongo_database)
    except pymongo.errors.PyMongoError as e:
        raise ZarkovError(f"cannot drop {where}: {e}") from None
    finally:
        client.close()
    print(f"dropped {where}")
    return 0
