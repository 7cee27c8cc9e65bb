"""zsend: JSON lines on stdin → events pushed to the event logger.

``zsend <bson uri> [<shared key> | @keyfile] [--linger SECONDS]
[--server-key FILE --client-key FILE]``

With ``--server-key`` (the servers' public key file) and ``--client-key`` (this
sender's secret key file, authorised on the servers) the events travel over CURVE.
The shared key is a shared password, sent in clear without CURVE.

Each non-blank line is one JSON object, ``{"$datetime": <unix seconds>}`` standing
for a datetime; it is sent as one BSON message (after the shared key frame when a
key is given; ``@file`` reads the key from the file's first line).  A line that is
not a JSON object is reported on stderr with its line number and skipped; the logger
validates the rest.  zsend waits until every event is handed to the logger, at most
``--linger`` seconds (default 30).

Exit status: 0 when every line was sent; 1 when some lines were skipped (the others
were sent); 2 on a usage error; 3 when the logger could not be reached in time.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

import bson

from zarkov import wire
from zarkov.client import ZarkovClient
from zarkov.eventlog.schema import Rejected, parse_json
from zarkov.security import ClientKeys


def _key(arg: str | None) -> str | None:
    if arg is None or not arg.startswith("@"):
        return arg
    with open(arg[1:], encoding="utf-8") as f:
        return f.readline().rstrip("\r\n")


def send_lines(client: ZarkovClient, lines: TextIO, err: TextIO) -> tuple[int, int]:
    """Send every JSON line; returns (sent, skipped)."""
    sent = skipped = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = bson.encode(parse_json(line))
        except Rejected as e:
            print(f"zsend: line {number}: skipped: {e}", file=err)
            skipped += 1
            continue
        except Exception as e:  # noqa: BLE001 - bson cannot hold it (an int over 64 bits ...)
            print(f"zsend: line {number}: skipped: cannot be encoded as BSON ({e})", file=err)
            skipped += 1
            continue
        if not client.send_raw(data):
            raise TimeoutError(f"line {number}: the event logger at {client.uri} "
                               "takes no more events")
        sent += 1
    return sent, skipped


def _refused(uri: str, why: str, keys) -> str:
    return (f"zsend: the event logger at {uri} {why}; events not sent"
            f"{'' if keys else ' (no --server-key/--client-key given)'}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zsend``; returns the exit status."""
    p = argparse.ArgumentParser(prog="zsend", description="Send JSON lines from stdin as "
                                "events to the Zarkov event logger.")
    p.add_argument("uri", help="the event logger's BSON address, e.g. tcp://127.0.0.1:6543")
    p.add_argument("key", nargs="?", help="shared key (a password), or @file holding it")
    p.add_argument("--linger", type=float, default=30.0,
                   help="seconds to wait for delivery (default 30)")
    p.add_argument("--server-key", metavar="FILE",
                   help="CURVE: the servers' public key file (security.server_public_key)")
    p.add_argument("--client-key", metavar="FILE",
                   help="CURVE: this sender's secret key file (security.client_key)")
    args = p.parse_args(argv)
    try:
        key = _key(args.key)
    except OSError as e:
        print(f"zsend: cannot read the key file: {e}", file=sys.stderr)
        return 2
    if bool(args.server_key) != bool(args.client_key):
        print("zsend: --server-key and --client-key go together", file=sys.stderr)
        return 2
    try:
        keys = ClientKeys.load(args.server_key, args.client_key) if args.server_key else None
    except ValueError as e:
        print(f"zsend: {e}", file=sys.stderr)
        return 2
    client = ZarkovClient(args.uri, shared_key=key, hwm=10000, send_timeout=args.linger,
                          linger=args.linger, keys=keys, watch_handshake=True)
    try:
        sent, skipped = send_lines(client, sys.stdin, sys.stderr)
    except TimeoutError as e:
        refused = client.handshake()
        print(f"zsend: {e}" if refused in (None, "ok") else
              _refused(args.uri, refused, keys), file=sys.stderr)
        client.close(0)
        return 3
    except KeyboardInterrupt:
        client.close(0)
        return 130
    started = time.monotonic()
    # Why look: a logger that refuses the handshake makes ZeroMQ drop what is queued,
    # and the close below would then look like a delivery.
    refused = client.handshake(min(max(args.linger, 0.0), 5.0)) if sent else None
    if refused not in (None, "ok"):
        print(_refused(args.uri, refused, keys), file=sys.stderr)
        client.close(0)
        return 3
    waited = time.monotonic() - started
    client.close(args.linger if args.linger < 0 else max(0.0, args.linger - waited))
    wire.context().term()  # returns when every queued event is handed over, or at linger
    # ZeroMQ cannot say whether linger ran out with events still queued; a close that
    # took the whole linger time is the sign of it.
    if args.linger >= 0 and sent and time.monotonic() - started >= args.linger - 0.05:
        print(f"zsend: the event logger at {args.uri} did not take every event within "
              f"{args.linger:g} s; some may be lost", file=sys.stderr)
        return 3
    if skipped:
        print(f"zsend: sent {sent} event(s), skipped {skipped} line(s)", file=sys.stderr)
        return 1
    return 0
