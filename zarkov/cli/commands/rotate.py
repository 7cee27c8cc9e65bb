"""zcmd rotate: event → event.0 → event.1 …, dumping and dropping the oldest."""
from __future__ import annotations

import argparse

from zarkov.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``<dump dir>``."""
    parser.add_argument("dump_dir", help="directory for the BSON dump of the dropped collection")


def run(config: Config, args: argparse.Namespace) -> int:
    """Rotate, keeping ``num_event_logs`` collections; print each step."""
    import pymongo

    from zarkov.eventlog.rotate import rotate
    client: pymongo.MongoClient = pymongo.MongoClient(config.mongo_uri,
                                                      serverSelectionTimeoutMS=10000)
    try:  # a RotateError goes to zcmd's handler: "zcmd rotate: …", exit 1
        for line in rotate(client[config.mongo_database], args.dump_dir,
                           config.num_event_logs, config.agg_lease_seconds):
            print(f"rotate: {line}")
    finally:
        client.close()
    return 0
