"""Helpers for the event-logger tests: start the logger, read its stats, push messages."""
from __future__ import annotations

import json
import os
import subprocess

import bson
import yaml
import zmq

from tests.support import Processes, wait_for


def load(path: str) -> dict:
    """The YAML config at ``path`` as a dict."""
    with open(path) as f:
        return yaml.safe_load(f)


def stats(journal: str, index: int = 0) -> dict:
    """The stats file of event server ``index`` ({} when not written yet)."""
    try:
        with open(os.path.join(journal, f"stats-{index}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def start_logger(procs: Processes, config_path: str, name: str = "eventlog",
                 env: dict | None = None) -> subprocess.Popen:
    """Start ``zcmd eventlog`` and wait until its server has written its first stats."""
    p = procs.zcmd(name, config_path, "eventlog", env=env)
    journal = load(config_path)["journal"]
    wait_for(lambda: p.poll() is None and stats(journal).get("pid") == p.pid, timeout=30,
             what=f"the event logger to start (log: {procs.log(name)[-500:]!r})")
    return p


def wait_accepted(procs: Processes, p: subprocess.Popen, journal: str, n: int,
                  timeout: float = 60) -> dict:
    """Wait until the logger process ``p`` has accepted ``n`` events; its stats."""
    return wait_for(lambda: (s := stats(journal)).get("pid") == p.pid
                    and s["accepted"] >= n and s, timeout=timeout,
                    what=f"{n} events accepted")


def push(uri: str, messages: list, key: bytes | None = None, keys=None,
         linger: float = 30.0) -> None:
    """Push raw messages (bytes, or documents to encode as BSON) and wait for delivery
    (at most ``linger`` seconds); ``keys`` (ClientKeys) for a CURVE logger."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 0)
    if keys is not None:
        keys.apply(sock)
    sock.connect(uri)
    for m in messages:
        data = m if isinstance(m, bytes) else bson.encode(m)
        if key is None:
            sock.send(data)
        else:
            sock.send_multipart([key, data])
    sock.close(linger=int(linger * 1000))
    ctx.term()


def seqs(coll) -> list[int]:
    """``extra.seq`` of every document of ``coll``, sorted (duplicates kept)."""
    return sorted(d["extra"]["seq"] for d in coll.find({}, {"extra.seq": 1}))
