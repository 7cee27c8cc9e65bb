"""perftest: send synthetic events to the event logger at a given rate, for load tests.

``concurrency`` greenlets each push their share of ``n`` events on their own socket,
paced so that together they send ``rate`` events per second (0 = as fast as they can).
A line per second says how many were sent; the last line gives the overall rate.
"""
from __future__ import annotations

import random
import sys
import time
from typing import TextIO

import bson
import gevent

from zarkov.client import ZarkovClient
from zarkov.runtime import loops
from zarkov.security import ClientKeys

TYPES = ("login", "create", "download", "view", "commit", "comment")
TOOLS = ("wiki", "tickets", "git", "files", "discussion")


def synthetic_event(seq: int, rng: random.Random) -> dict:
    """One made-up event like the original site's (``extra.seq`` numbers it)."""
    project = f"project{rng.randrange(100)}"
    tool = rng.choice(TOOLS)
    return {
        "type": rng.choice(TYPES),
        "context": {"user": f"user{rng.randrange(1000)}", "project": project,
                    "neighborhood": f"nbhd{rng.randrange(5)}", "tool": tool,
                    "mount_point": tool, "is_project_member": rng.random() < 0.3},
        "extra": {"seq": seq, "sent": time.time()},
    }


def run(uri: str, n: int, concurrency: int, rate: float, shared_key: str | None = None,
        out: TextIO = sys.stdout, keys: ClientKeys | None = None) -> float:
    """Send ``n`` events (CURVE with ``keys``); return the achieved rate (events/s)."""
    concurrency = max(1, min(concurrency, n or 1))
    sent = [0]
    started = time.monotonic()

    def sender(worker: int) -> None:
        rng = random.Random(worker)
        client = ZarkovClient(uri, shared_key=shared_key, send_timeout=None, linger=-1,
                              keys=keys)
        interval = concurrency / rate if rate > 0 else 0.0
        try:
            for k, seq in enumerate(range(worker, n, concurrency)):
                if interval:
                    delay = started + k * interval - time.monotonic()
                    if delay > 0:
                        gevent.sleep(delay)
                client.send_raw(bson.encode(synthetic_event(seq, rng)))
                sent[0] += 1
                if k % 100 == 99:
                    loops.let_others_run()  # the reporter, the other senders
        finally:
            client.close()

    def reporter() -> None:
        last, second = 0, 0
        while True:
            gevent.sleep(1.0)
            second += 1
            now = sent[0]
            print(f"perftest: second {second}: sent {now - last} events ({now} in all)",
                  file=out, flush=True)
            last = now

    rep = gevent.spawn(reporter)
    gevent.joinall([gevent.spawn(sender, w) for w in range(concurrency)], raise_error=True)
    elapsed = max(time.monotonic() - started, 1e-9)
    rep.kill()
    achieved = sent[0] / elapsed
    print(f"perftest: sent {sent[0]} events in {elapsed:.2f} s: {achieved:.0f} events/s",
          file=out, flush=True)
    return achieved
