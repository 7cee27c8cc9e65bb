"""zcmd zmr-router: run only the map-reduce router."""
import argparse

from zarkov import supervise
from zarkov.config import Config
from zarkov.zmr.router import Router
from zarkov.zmr.signals import on_stop_signals

SUMMARY = "run the map-reduce router (clients and workers connect to zmr.req_uri)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(config: Config, args: argparse.Namespace) -> int:
    router = Router(config).start()
    on_stop_signals(router.stop)
    supervise.on_death(router.stop)
    router.serve_forever()
    return 0
