"""zcmd rotate: event → event.0 → event.1 …, dumping and dropping the oldest."""
import argparse
import sys

from zarkov.config import Config

SUMMARY = "rotate event → event.0 → event.1 …, dumping the oldest to a directory and dropping it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``<dump dir>``."""
    parser.add_argument("dump_dir", help="directory for the BSON dump of the dropped collection")


def run(config: Config, args: argparse.Namespace) -> int:
    """Rotate, keeping ``num_event_logs`` collections; print each step."""
    import pymongo

    from zarkov.eventlog.rotate import RotateError, rotate
    client = pymongo.MongoClient(config.mongo_uri, serverSelectionTimeoutMS=10000)
    try:
        for line in rotate(client[config.mongo_database], args.dump_dir,
                           config.num_event_logs, config.agg_lease_seconds):
            print(f"rotate: {line}")
    except RotateError as e:
        print(f"zcmd rotate: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0
