"""A real ``zcmd eventlog`` under fuzz: send anything, then prove nothing was lost.

:class:`FuzzedLogger` keeps PUSH sockets open to a running event logger and counts
every message it sends.  :meth:`FuzzedLogger.check` then proves the two ledgers
balance — every message sent was accepted or rejected with a reason, every accepted
event was stored or refused by the database — and that the logger still serves:
well-formed events sent last are all stored, once, and no loop hit an unexpected
exception.
"""
from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import uuid

import zmq

from tests.eventlog_util import stats
from tests.strategies import FUZZ_FACTOR
from tests.support import wait_for


def rejects_by_source(journal: str) -> collections.Counter:
    """Lines of rejects.jsonl per source (bson, json, database)."""
    counts: collections.Counter = collections.Counter()
    try:
        with open(os.path.join(journal, "rejects.jsonl"), "rb") as f:
            for line in f:
                counts[json.loads(line)["source"]] += 1
    except FileNotFoundError:
        pass
    return counts


class FuzzedLogger:
    """Senders to a running event logger with ``servers`` event-server processes."""

    def __init__(self, proc: subprocess.Popen, config: dict, servers: int):
        self.proc = proc
        self.config = config
        self.journal = config["journal"]
        self.servers = servers
        self.sent: collections.Counter = collections.Counter()
        self.ctx = zmq.Context()
        self.socks = {}
        for source, key in (("bson", "bson_bind_address"), ("json", "json_bind_address")):
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.LINGER, 10000)
            s.connect(config[key])
            self.socks[source] = s
        self.pids = self.server_pids()

    def server_pids(self) -> list[int]:
        """The pid of each event-server process, from its stats file."""
        return [stats(self.journal, i).get("pid") for i in range(self.servers)]

    def send(self, source: str, frames: list[bytes]) -> None:
        """Send one (multipart) message to the BSON or JSON socket."""
        self.socks[source].send_multipart(frames)
        self.sent[source] += 1

    def raw_tcp(self, source: str, data: bytes) -> None:
        """Connect to a socket's TCP port without ZeroMQ and send bytes (not counted)."""
        host, port = self.config[f"{source}_bind_address"][6:].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            try:
                s.sendall(data)
            except OSError:  # ZeroMQ may hang up on garbage at once
                pass

    def alive(self) -> bool:
        """The logger and its event servers are the processes that started."""
        return self.proc.poll() is None and self.server_pids() == self.pids

    def ledger(self) -> dict:
        """Counters summed over the servers, and the rejects per source."""
        snaps = [stats(self.journal, i) for i in range(self.servers)]
        out = {k: sum(s.get(k, 0) for s in snaps)
               for k in ("accepted", "rejected", "committed", "errors", "backlog_files")}
        out["rejects"] = rejects_by_source(self.journal)
        return out

    def balanced(self) -> dict | None:
        """The ledger once it balances (None before)."""
        led = self.ledger()
        rej = led["rejects"]
        ok = (led["accepted"] + rej["bson"] + rej["json"] == sum(self.sent.values())
              and led["committed"] + rej["database"] == led["accepted"]
              and led["rejected"] == sum(rej.values()) and led["backlog_files"] == 0)
        return led if ok else None

    def check(self, event_coll, n: int = 30, timeout: float = 180 * FUZZ_FACTOR) -> dict:
        """Wait until every message is accounted for, then send ``n`` well-formed
        events to each socket and wait until each is stored once; the final ledger."""
        assert self.alive(), "an event-logger process died or was restarted"
        wait_for(self.balanced, timeout=timeout, interval=0.2,
                 what=f"every message accounted for (sent {dict(self.sent)})")
        token = uuid.uuid4().hex
        for i in range(n):
            self.send("bson", [_bson({"type": "final", "extra": {"token": token, "seq": i}})])
            self.send("json", [json.dumps({"type": "final",
                                           "extra": {"token": token, "seq": n + i}}).encode()])
        wait_for(lambda: event_coll.count_documents({"extra.token": token}) >= 2 * n,
                 timeout=timeout, what=f"the {2 * n} well-formed events stored")
        seqs = sorted(d["extra"]["seq"] for d in event_coll.find({"extra.token": token}))
        assert seqs == list(range(2 * n))
        led = wait_for(self.balanced, timeout=timeout, interval=0.2, what="the final ledger")
        assert led["errors"] == 0, f"unexpected exceptions in the logger's loops: {led}"
        assert self.alive()
        return led

    def close(self) -> None:
        """Close the senders (queued messages get ten seconds to leave)."""
        for s in self.socks.values():
            s.close()
        self.ctx.term()


def _bson(doc: dict) -> bytes:
    import bson
    return bson.encode(doc)
