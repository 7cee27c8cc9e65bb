"""zcmd init: drop the Zarkov database (every event and aggregate).

On a terminal it asks for confirmation; ``--force`` skips it.  Not on a terminal and
without ``--force`` it refuses (exit 2): a script must say it means it.
"""
import argparse
import sys

import pymongo

from zarkov.config import Config

SUMMARY = "drop the Zarkov database (all events and aggregates)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="do not ask for confirmation")


def run(config: Config, args: argparse.Namespace) -> int:
    where = f"database '{config.mongo_database}' on {config.mongo_uri}"
    if not args.force:
        if not sys.stdin.isatty():
            print(f"zcmd init: refusing to drop {where} without --force "
                  f"(not on a terminal)", file=sys.stderr)
            return 2
        answer = input(f"Drop {where}, with every event and aggregate? "
                       f"Type the database name to confirm: ")
        if answer.strip() != config.mongo_database:
            print("zcmd init: not confirmed; nothing dropped", file=sys.stderr)
            return 1
    client = pymongo.MongoClient(config.mongo_uri, serverSelectionTimeoutMS=10000)
    try:
        client.drop_database(config.mongo_database)
    except pymongo.errors.PyMongoError as e:
        print(f"zcmd init: cannot drop {where}: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(f"dropped {where}")
    return 0
