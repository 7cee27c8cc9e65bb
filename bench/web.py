#!/usr/bin/env python3
"""Benchmark the web service's /q: requests per second and latency against a plain find.

Setup: a ``zagg.bench`` collection of ``--keys`` (10,000) keys, one per minute
(``"2024-01-01T00:00"`` ...), each ``{value: {a, b}}``, and ``zcmd web-server`` on
loopback (one process: Flask on gevent.pywsgi) over it.

For each run:

1. web: ``--clients`` (8) threads, each with its own keep-alive connection, ask
   ``/q?c=bench&b=<key i>&e=<key i + range - 1>`` for ranges of ``--range`` (1,000)
   keys at random offsets, for ``--seconds`` (15) or ``--requests`` at most; requests
   per second over the run and the p50/p99 latency of every request;
2. baseline: one process, one pymongo client, the same ranges read with
   ``find({_id: {$gte: b, $lte: e}}, {value: 1}).sort(_id)`` one after another, for
   the same time: finds per second and their p50/p99;
3. the same from ``--clients`` threads of that process (the database under the same
   concurrency as the web service puts on it).

Prints each run, then medians and the ratios web / baseline, on each server
(``--server``, see bench/servers.py: both bundled servers by default), then the
figures side by side.  On the bundled FerretDB every range filter decodes the whole
collection, which bounds every side alike.  Usage: ``python bench/web.py [--server
both] [--keys 10000] [--range 1000] [--clients 8] [--runs 3]``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import http.client
import importlib.metadata
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pymongo
import servers
import yaml
from ingest import free_port

START = dt.datetime(2024, 1, 1)


def key(i: int) -> str:
    return (START + dt.timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M")


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def web_run(port: int, keys: int, span: int, clients: int, seconds: float,
            max_requests: int) -> dict:
    """``clients`` threads asking /q until the time or the request budget is spent."""
    latencies: list[float] = []
    lock = threading.Lock()
    budget = [max_requests]
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            while time.monotonic() < deadline:
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                i = rng.randrange(keys - span + 1)
                t0 = time.perf_counter()
                conn.request("GET", f"/q?c=bench&b={key(i)}&e={key(i + span - 1)}")
                r = conn.getresponse()
                body = r.read()
                t = time.perf_counter() - t0
                if r.status != 200:
                    errors.append(f"{r.status} {body[:200]!r}")
                    return
                with lock:
                    latencies.append(t)
        finally:
            conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(s,)) for s in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"bench/web.py: /q failed: {errors[0]}")
    return {"rate": len(latencies) / elapsed, "n": len(latencies),
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}


def find_run(coll, keys: int, span: int, threads: int, seconds: float,
             max_requests: int) -> dict:
    """The same ranges with pymongo from this one process: ``threads`` threads sharing
    one client, each reading one range after another."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            with lock:
                if len(latencies) >= max_requests:
                    return
            i = rng.randrange(keys - span + 1)
            t1 = time.perf_counter()
            docs = list(coll.find({"_id": {"$gte": key(i), "$lte": key(i + span - 1)}},
                                  {"value": 1}).sort("_id", 1))
            with lock:
                latencies.append(time.perf_counter() - t1)
            assert len(docs) == span
    t0 = time.perf_counter()
    workers = [threading.Thread(target=reader, args=(99 + s,)) for s in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"rate": len(latencies) / elapsed, "n": len(latencies),
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=10000)
    ap.add_argument("--range", type=int, default=1000, help="keys per /q")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each side of a run")
    ap.add_argument("--requests", type=int, default=5000, help="most requests of each side")
    ap.add_argument("--runs", type=int, default=3)
    servers.add_argument(ap)
    args = ap.parse_args()
    chosen = servers.chosen(args)
    figures = {server.label: measure(server, args) for server in chosen}
    servers.side_by_side(f"bench/web.py: /q over {args.range:,} of {args.keys:,} keys, "
                         f"{args.clients} clients, medians of {args.runs} runs", chosen, figures)
    return 0


def measure(server: servers.Server, args) -> dict[str, str]:
    """Every figure on one database server."""
    uri = server.uri
    client = pymongo.MongoClient(uri)
    db_name = f"zarkov_bench_web_{uuid.uuid4().hex[:8]}"
    db = client[db_name]
    tmp = tempfile.mkdtemp(prefix="zarkov-bench-web-")
    port = free_port()
    cfg = {"mongo_uri": uri, "mongo_database": db_name, "web_port": port,
           "journal": os.path.join(tmp, "journal"),
           "zmr": {"req_uri": f"tcp://127.0.0.1:{free_port()}"}}
    path = os.path.join(tmp, "zarkov.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    coll = db["zagg.bench"]
    docs = [{"_id": key(i), "value": {"a": i, "b": i % 7}} for i in range(args.keys)]
    for i in range(0, len(docs), 1000):
        coll.insert_many(docs[i:i + 1000])
    log = open(os.path.join(tmp, "web-server.log"), "w")
    server_proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "zcmd"), "-y",
                                    path, "web-server"], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_answering(port, server_proc, log.name)
        versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("Flask", "gevent"))
        servers.heading(server, f"/q over {args.range:,} of {args.keys:,} keys, "
                        f"{args.clients} clients on loopback against zcmd web-server (one "
                        f"process: {versions}, gevent.pywsgi); baseline: pymongo "
                        f"{pymongo.version} find of the same range from one process; "
                        f"{args.runs} runs of {args.seconds:g} s a side; {os.cpu_count()} cores")
        sides = ("/q", "find x1", f"find x{args.clients}")
        runs = []
        for i in range(args.runs):
            run = (web_run(port, args.keys, args.range, args.clients, args.seconds, args.requests),
                   find_run(coll, args.keys, args.range, 1, args.seconds, args.requests),
                   find_run(coll, args.keys, args.range, args.clients, args.seconds,
                            args.requests))
            runs.append(run)
            print(f"run {i + 1}: " + "; ".join(
                f"{name} {r['rate']:.2f}/s ({r['n']}), p50 {r['p50'] * 1000:.0f} ms, "
                f"p99 {r['p99'] * 1000:.0f} ms" for name, r in zip(sides, run))
                + f"; /q / find x1 {run[0]['rate'] / run[1]['rate']:.2f}", flush=True)
        med = [{k: statistics.median(r[j][k] for r in runs) for k in ("rate", "p50", "p99")}
               for j in range(3)]
        ratio1 = statistics.median(r[0]["rate"] / r[1]["rate"] for r in runs)
        ratio8 = statistics.median(r[0]["rate"] / r[2]["rate"] for r in runs)
        w, b, b8 = med
        print(f"median of {args.runs}: /q {w['rate']:.2f} requests/s with {args.clients} "
              f"clients, p50 {w['p50'] * 1000:.0f} ms, p99 {w['p99'] * 1000:.0f} ms; pymongo "
              f"find from one process: {b['rate']:.2f}/s one at a time (p50 "
              f"{b['p50'] * 1000:.0f} ms, p99 {b['p99'] * 1000:.0f} ms), {b8['rate']:.2f}/s "
              f"from {args.clients} threads (p50 {b8['p50'] * 1000:.0f} ms); /q throughput = "
              f"{ratio1:.2f}x the single find's, {ratio8:.2f}x the {args.clients}-thread "
              f"find's (medians of the runs' ratios)", flush=True)
        return {f"/q, {args.clients} clients (requests/s)": f"{w['rate']:.2f}",
                "/q p50 / p99 (ms)": f"{w['p50'] * 1000:.0f} / {w['p99'] * 1000:.0f}",
                "find, one at a time (finds/s)": f"{b['rate']:.2f}",
                f"find, {args.clients} threads (finds/s)": f"{b8['rate']:.2f}",
                "/q / find x1": f"{ratio1:.2f}x",
                f"/q / find x{args.clients}": f"{ratio8:.2f}x"}
    finally:
        os.killpg(server_proc.pid, signal.SIGTERM)
        try:
            server_proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server_proc.pid, signal.SIGKILL)
            server_proc.wait()
        log.close()
        client.drop_database(db_name)
        client.close()


def wait_answering(port: int, proc: subprocess.Popen, log_name: str) -> None:
    """Wait until the web server answers a small /q (60 s at most)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", f"/q?c=bench&b={key(0)}&e={key(2)}")
            reply = conn.getresponse()
            body = json.loads(reply.read())
            conn.close()
            assert body["a"][2][1] == 2, body
            return
        except (OSError, http.client.HTTPException):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"bench/web.py: zcmd web-server did not answer "
                                 f"(log: {log_name})") from None
            time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
