"""Which servers a benchmark measures, and its figures side by side per server.

Every benchmark takes ``--server ferretdb|java|both`` (default: both bundled servers,
each started with ``scripts/dev-db``); ``$ZARKOV_TEST_MONGO_URI`` names another
server instead (a real mongod, say).  Each server is named with its version in the
headings, since a figure measures the server as much as Zarkov.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pymongo

from zarkov import storage

KINDS = ("ferretdb", "java")


@dataclass
class Server:
    """One server to measure: its URI and how to name it."""

    uri: str
    #: ``FerretDB 1.24.2 (MongoDB 7.0.77, wire 21)``.
    label: str
    #: ``FerretDB 1.24.2``: a column heading.
    short: str


def add_argument(parser: argparse.ArgumentParser) -> None:
    """``--server``: which bundled server(s) to measure."""
    parser.add_argument("--server", choices=[*KINDS, "both"], default="both",
                        help="bundled server to measure (default both, side by side); "
                             "$ZARKOV_TEST_MONGO_URI names another instead")


def start(kind: str) -> str:
    """Start a bundled server with scripts/dev-db (idempotent); its URI."""
    out = subprocess.run([os.path.join(ROOT, "scripts", "dev-db"), "start", kind],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench: cannot start the {kind} server: {out.stderr.strip()}")
    return out.stdout.split()[-1]


def describe(uri: str) -> Server:
    """Name the server at ``uri``."""
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10000)
    try:
        who = storage.identify(client)
    finally:
        client.close()
    return Server(uri, who.label, f"{who.server} {who.version}")


def chosen(args: argparse.Namespace) -> list[Server]:
    """The servers ``args`` asks for, started if need be."""
    uri = os.environ.get("ZARKOV_TEST_MONGO_URI")
    if uri:
        return [describe(uri)]
    kinds = KINDS if args.server == "both" else (args.server,)
    return [describe(start(k)) for k in kinds]


def heading(server: Server, text: str) -> None:
    """Print a section heading naming the server."""
    print(f"\n#### {server.label} at {server.uri}: {text}", flush=True)


def side_by_side(title: str, servers: list[Server], figures: dict[str, dict[str, str]]) -> None:
    """Print ``figures`` ({server label: {figure: value}}) as a table, a column a server."""
    names: list[str] = []
    for per_server in figures.values():
        names += [n for n in per_server if n not in names]
    cells = [figures.get(s.label, {}) for s in servers]
    width = max([len(n) for n in names] + [0])
    col = max([len(s.short) for s in servers] + [len(v) for c in cells for v in c.values()])
    print(f"\n== {title}")
    print(f"   {'':<{width}}  " + "  ".join(s.short.rjust(col) for s in servers))
    for n in names:
        print(f"   {n:<{width}}  " + "  ".join(c.get(n, "-").rjust(col) for c in cells))
    for s in servers:
        print(f"   {s.short}: {s.label} at {s.uri}")
    sys.stdout.flush()
