#!/usr/bin/env python3
"""Benchmark the event logger: sustained ingest rate against the database's own ceiling.

For each run:

1. ceiling: the same documents the logger would store (``_id``, ``timestamp``,
   ``context``, ``type``, ``extra``) written straight to the server with
   ``insert_many`` batches of ``--batch`` documents, one client;
2. logger: ``zcmd eventlog`` on loopback with a fresh journal; 4 client processes
   (``--clients``) push their share of ``--events`` pre-encoded BSON events as fast
   as the logger takes them; the clock stops when every event is in MongoDB (the
   logger's stats say so; a count confirms).  That includes the commit of the last
   journal file after one idle second, so the "steady" rate (10 % → 90 % of the
   events committed) is printed too.  Latency send → stored is measured on probe
   events that this process pushes every 20 ms on a fifth socket during the load,
   each looked up by its ``_id`` until it is found.

Prints each run, then the medians and the ratio logger / ceiling (target ≥ 0.7).
Usage: ``python bench/ingest.py [--events 100000] [--runs 3] [--servers 1]``; the
database is ``$ZARKOV_TEST_MONGO_URI`` or the bundled one (``scripts/dev-db start``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bson  # noqa: E402
import pymongo  # noqa: E402
import yaml  # noqa: E402
import zmq  # noqa: E402
from bson import ObjectId  # noqa: E402
from bson.raw_bson import RawBSONDocument  # noqa: E402

PROBE_EVERY = 0.02


def event(seq: int) -> dict:
    """One synthetic event (about 250 bytes of BSON once stored)."""
    return {"type": ("login", "download", "create", "view")[seq % 4],
            "context": {"user": f"user{seq % 997}", "project": f"project{seq % 101}",
                        "neighborhood": "projects", "tool": "wiki", "mount_point": "wiki",
                        "is_project_member": seq % 3 == 0},
            "extra": {"seq": seq, "path": f"/p/project{seq % 101}/wiki/Page{seq % 53}/"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mongo_uri() -> str:
    uri = os.environ.get("ZARKOV_TEST_MONGO_URI")
    if uri:
        return uri
    out = subprocess.run([os.path.join(ROOT, "scripts", "dev-db"), "start"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


# -- a client process ------------------------------------------------------------------

def client_main(uri: str, first: int, count: int) -> None:
    """Pre-encode ``count`` events, say ready, wait for "go", push them, report."""
    msgs = [bson.encode(event(s)) for s in range(first, first + count)]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(uri)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.time()
    for m in msgs:
        sock.send(m)
    sock.close(linger=-1)
    ctx.term()
    print(json.dumps({"sent": count, "seconds": time.time() - t0}), flush=True)


# -- the ceiling -------------------------------------------------------------------------

def ceiling(client: pymongo.MongoClient, n: int, batch: int) -> float:
    """Events per second of insert_many batches of the stored form of the events."""
    db_name = "zbench_" + uuid.uuid4().hex[:8]
    now = dt.datetime.now(dt.timezone.utc)
    docs = [RawBSONDocument(bson.encode({"_id": ObjectId(), "timestamp": now, **event(s)}))
            for s in range(n)]
    coll = client[db_name].event
    try:
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            coll.insert_many(docs[i:i + batch], ordered=False)
        elapsed = time.perf_counter() - t0
        assert coll.estimated_document_count() == n
        return n / elapsed
    finally:
        client.drop_database(db_name)


# -- the logger ----------------------------------------------------------------------------

def read_stats(journal: str, servers: int) -> dict:
    total = {"committed": 0, "accepted": 0, "pids": []}
    for i in range(servers):
        try:
            with open(os.path.join(journal, f"stats-{i}.json")) as f:
                s = json.load(f)
        except (OSError, ValueError):
            continue
        total["committed"] += s["committed"]
        total["accepted"] += s["accepted"]
        total["pids"].append(s["pid"])
    return total


def logger_run(client: pymongo.MongoClient, uri: str, n: int, clients: int,
               servers: int) -> dict:
    """One measured run of ``zcmd eventlog``: rates and probe latencies."""
    tmp = tempfile.mkdtemp(prefix="zbench-")
    db_name = "zbench_" + uuid.uuid4().hex[:8]
    bson_addr = f"tcp://127.0.0.1:{free_port()}"
    cfg = {"mongo_uri": uri, "mongo_database": db_name, "bson_bind_address": bson_addr,
           "bson_uri": bson_addr, "json_bind_address": f"tcp://127.0.0.1:{free_port()}",
           "journal": os.path.join(tmp, "journal"), "num_event_servers": servers,
           "verbose": bool(os.environ.get("ZBENCH_DEBUG"))}
    path = os.path.join(tmp, "zarkov.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    env = dict(os.environ, PYTHONPATH=ROOT)
    log = open(os.path.join(tmp, "eventlog.log"), "wb")
    logger = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "zcmd"), "-y", path,
                               "eventlog"], stdout=log, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    senders = []
    try:
        deadline = time.time() + 30
        while len(read_stats(cfg["journal"], servers)["pids"]) < servers:
            if time.time() > deadline or logger.poll() is not None:
                raise RuntimeError(f"the event logger did not start; see {log.name}")
            time.sleep(0.05)
        share = [n // clients + (1 if i < n % clients else 0) for i in range(clients)]
        first = 0
        for count in share:
            senders.append(subprocess.Popen(
                [sys.executable, __file__, "--client", bson_addr, str(first), str(count)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
            first += count
        for p in senders:
            assert p.stdout.readline().strip() == "ready"

        ctx = zmq.Context()
        probe_sock = ctx.socket(zmq.PUSH)
        probe_sock.connect(bson_addr)
        coll = client[db_name].event
        probes: list[tuple[ObjectId, float]] = []   # (id, sent) not yet seen
        latencies: list[float] = []
        marks: list[tuple[float, int]] = []
        t0 = time.time()
        for p in senders:
            p.stdin.write("go\n")
            p.stdin.flush()
        next_probe = t0
        sending = True
        while True:
            now = time.time()
            if sending and now >= next_probe:
                oid = ObjectId()
                probe_sock.send(bson.encode({"_id": oid, "type": "probe", "extra": {"seq": -1}}))
                probes.append((oid, time.time()))
                next_probe += PROBE_EVERY
                sending = any(p.poll() is None for p in senders)
            while probes and coll.find_one({"_id": probes[0][0]}, {"_id": 1}) is not None:
                latencies.append(time.time() - probes.pop(0)[1])
            committed = read_stats(cfg["journal"], servers)["committed"]
            if not marks or marks[-1][1] != committed:
                marks.append((time.time(), committed))
            if committed >= n + len(latencies) + len(probes) and not sending and not probes:
                break
            if logger.poll() is not None:
                raise RuntimeError(f"the event logger exited; see {log.name}")
            time.sleep(0.005)
        # The logger's stats say when the last event was committed; count to be sure.
        end = marks[-1][0]
        total_probes = len(latencies)
        stored = coll.count_documents({"type": {"$ne": "probe"}})
        assert stored == n, f"{stored} events stored, {n} sent"
        elapsed = end - t0
        lo = next(t for t, c in marks if c >= 0.1 * n)
        hi = next(t for t, c in marks if c >= 0.9 * n)
        probe_sock.close(0)
        ctx.term()
        if os.environ.get("ZBENCH_DEBUG"):
            print("marks", [(round(t - t0, 2), c) for t, c in marks][:40], file=sys.stderr)
        return {"rate": n / elapsed, "steady": 0.8 * n / max(hi - lo, 1e-9),
                "seconds": elapsed, "probes": total_probes,
                "lat_median": statistics.median(latencies),
                "lat_p99": sorted(latencies)[max(0, int(len(latencies) * 0.99) - 1)]}
    finally:
        for p in senders:
            if p.poll() is None:
                p.kill()
            p.wait()
        if logger.poll() is None:
            os.killpg(logger.pid, signal.SIGTERM)
            try:
                logger.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(logger.pid, signal.SIGKILL)
                logger.wait()
        log.close()
        client.drop_database(db_name)
        if not os.environ.get("ZBENCH_DEBUG"):
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--servers", type=int, default=1, help="num_event_servers")
    ap.add_argument("--batch", type=int, default=2000, help="insert_many batch of the ceiling")
    args = ap.parse_args()
    uri = mongo_uri()
    client = pymongo.MongoClient(uri)
    print(f"ingest benchmark: {args.events} events, {args.clients} clients, "
          f"{args.servers} event server(s), ceiling batches of {args.batch}, {args.runs} runs, "
          f"{os.cpu_count()} cores, database {uri}")
    ceilings, runs = [], []
    for i in range(args.runs):
        c = ceiling(client, args.events, args.batch)
        r = logger_run(client, uri, args.events, args.clients, args.servers)
        ceilings.append(c)
        runs.append(r)
        print(f"run {i + 1}: ceiling {c:,.0f}/s; logger {r['rate']:,.0f}/s end to end "
              f"({r['seconds']:.2f} s), {r['steady']:,.0f}/s steady; ratio {r['rate'] / c:.2f}; "
              f"latency median {r['lat_median'] * 1000:.0f} ms, p99 {r['lat_p99'] * 1000:.0f} ms "
              f"({r['probes']} probes)", flush=True)
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("rate", "steady", "lat_median", "lat_p99")}
    ceil = statistics.median(ceilings)
    print(f"median: ceiling {ceil:,.0f} events/s; logger {med['rate']:,.0f} events/s end to end "
          f"= {med['rate'] / ceil:.2f}x the ceiling (target >= 0.7); steady "
          f"{med['steady']:,.0f}/s = {med['steady'] / ceil:.2f}x; latency send->stored median "
          f"{med['lat_median'] * 1000:.0f} ms, p99 {med['lat_p99'] * 1000:.0f} ms")
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
