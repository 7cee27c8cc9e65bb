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
   journal file, so the "steady" rate (10 % → 90 % of the events committed) is
   printed too;
3. latency: the same 4 clients paced at ``--load`` × the ceiling for
   ``--paced-seconds``, a load the logger can sustain (under a flat-out burst the
   latency only measures the queue, printed as "burst latency");
4. CURVE: steps 2 and 3 again with the logger's sockets CURVE servers and the
   clients authorised CURVE clients (keys made for the run), for the ratio
   CURVE / plain (target >= 0.8); ``--no-curve`` skips it.

Latency send → stored is computed for every event from the clients' send times and
the logger's commit timeline (its stats file lists the time and running total of
each acknowledged insert), taking the journal as first in, first out; the database
is not polled, since a FerretDB look-up by ``_id`` scans the collection.

Prints each run, then the medians and the ratio logger / ceiling (target ≥ 0.9;
latency p99 ≤ 250 ms at half the ceiling), and the CPU time per event of the logger's
processes and of the database server (found by its port with ``ss``) during the flat
out runs: on a machine of few cores they share, what bounds the ratio.
All of it runs on each database server (``--server``, see bench/servers.py: both
bundled servers by default), then the figures are printed side by side.  Usage:
``python bench/ingest.py [--server both] [--events 100000] [--runs 3]
[--event-servers 1]``; ``ZARKOV_BENCH_PROFILE=PREFIX`` profiles the logger (cProfile,
a file per run).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bson
import pymongo
import servers
import yaml
import zmq
from bson import ObjectId
from bson.raw_bson import RawBSONDocument
from procstat import cpu_seconds, listening_pid

from tests.support import free_port
from zarkov import keyfiles as K
from zarkov.security import ClientKeys


def event(seq: int) -> dict:
    """One synthetic event (about 250 bytes of BSON once stored)."""
    return {"type": ("login", "download", "create", "view")[seq % 4],
            "context": {"user": f"user{seq % 997}", "project": f"project{seq % 101}",
                        "neighborhood": "projects", "tool": "wiki", "mount_point": "wiki",
                        "is_project_member": seq % 3 == 0},
            "extra": {"seq": seq, "path": f"/p/project{seq % 101}/wiki/Page{seq % 53}/"}}


# -- a client process ------------------------------------------------------------------

def client_main(uri: str, first: int, count: int, rate: float,
                keys: list[str] | None = None) -> None:
    """Pre-encode ``count`` events, say ready, wait for "go", push them (at ``rate``
    events/s, 0 = flat out), report.  ``keys``: [server public, client secret] files."""
    msgs = [bson.encode(event(s)) for s in range(first, first + count)]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    if keys:
        ClientKeys.load(*keys).apply(sock)
    sock.connect(uri)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.time()
    sent = []
    if rate <= 0:
        for m in msgs:
            sock.send(m)
            sent.append(time.time())
    else:
        for k, m in enumerate(msgs):
            delay = t0 + k / rate - time.time()
            if delay > 0.002:
                time.sleep(delay)
            sock.send(m)
            sent.append(time.time())
    sock.close(linger=-1)
    ctx.term()
    print(json.dumps(sent), flush=True)


# -- the ceiling -------------------------------------------------------------------------

WARMUPS = 5   # most ceilings measured, not counted, to warm the server up
WARM = 0.2    # two ceilings in a row within this fraction: the server is warm

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
    """Counters summed over the server processes, and their commit timelines."""
    total: dict = {"committed": 0, "accepted": 0, "pids": [], "commits": []}
    for i in range(servers):
        try:
            with open(os.path.join(journal, f"stats-{i}.json")) as f:
                s = json.load(f)
        except (OSError, ValueError):
            continue
        total["committed"] += s["committed"]
        total["accepted"] += s["accepted"]
        total["pids"].append(s["pid"])
        total["commits"].append(s.get("commits", []))
    return total


def latencies(send_times: list[float], timelines: dict[int, dict[float, int]]) -> list[float]:
    """Send → stored of every event, taking the journal as first in, first out.

    With one server, the k-th event sent is the k-th journaled and committed, so it
    is stored at the first commit whose running total reaches k.  With several
    servers each takes every n-th message, and the same holds per server, roughly.
    """
    servers = len(timelines)
    out = []
    for index, timeline in timelines.items():
        points = sorted(timeline.items())
        mine = send_times[index::servers]
        j = 0
        for k, sent in enumerate(mine, 1):
            while j < len(points) and points[j][1] < k:
                j += 1
            if j == len(points):
                break
            out.append(points[j][0] - sent)
    return out


def make_keys(directory: str) -> dict:
    """A server key pair and one authorised client key: the config section and the
    clients' key files."""
    server_public, server_secret = K.new_key_pair(directory, "server")
    client_public, client_secret = K.new_key_pair(directory, "client")
    authorized = os.path.join(directory, "authorized")
    K.authorize(client_public, authorized)
    return {"security": {"server_key": server_secret, "authorized_keys": authorized},
            "client": [server_public, client_secret]}


def logger_run(client: pymongo.MongoClient, uri: str, n: int, clients: int,
               servers: int, rate: float = 0.0, keys: dict | None = None,
               server_pid: int | None = None) -> dict:
    """One measured run of ``zcmd eventlog``: rates, latencies, and the CPU per event
    of the logger's processes and of the database server (``server_pid``), from the
    clients' start to the last insert.

    ``rate`` (events/s in all, 0 = flat out) paces the clients; ``keys`` (from
    :func:`make_keys`) makes every socket CURVE."""
    tmp = tempfile.mkdtemp(prefix="zbench-")
    db_name = "zbench_" + uuid.uuid4().hex[:8]
    bson_addr = f"tcp://127.0.0.1:{free_port()}"
    cfg = {"mongo_uri": uri, "mongo_database": db_name, "bson_bind_address": bson_addr,
           "bson_uri": bson_addr, "json_bind_address": f"tcp://127.0.0.1:{free_port()}",
           "journal": os.path.join(tmp, "journal"), "num_event_servers": servers,
           **({"security": keys["security"]} if keys else {})}
    path = os.path.join(tmp, "zarkov.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    env = dict(os.environ, PYTHONPATH=ROOT)
    log = open(os.path.join(tmp, "eventlog.log"), "wb")
    # ZARKOV_BENCH_PROFILE=PREFIX: the logger runs under cProfile, its profile written
    # to PREFIX.<database> when it stops (every greenlet's time: they share a thread).
    profile = os.environ.get("ZARKOV_BENCH_PROFILE")
    under = ([sys.executable, "-m", "cProfile", "-o", f"{profile}.{db_name}"] if profile
             else [sys.executable])
    logger = subprocess.Popen([*under, os.path.join(ROOT, "scripts", "zcmd"), "-y", path,
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
                [sys.executable, __file__, "--client", bson_addr, str(first), str(count),
                 str(rate / clients), *(keys["client"] if keys else [])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
            first += count
        for p in senders:
            assert p.stdout.readline().strip() == "ready"
        workers = sorted({logger.pid, *read_stats(cfg["journal"], servers)["pids"]})
        cpu0 = sum(map(cpu_seconds, workers))
        db_cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
        t0 = time.time()
        for p in senders:
            p.stdin.write("go\n")
            p.stdin.flush()
        timelines: dict[int, dict[float, int]] = {i: {} for i in range(servers)}
        while True:
            st = read_stats(cfg["journal"], servers)
            for i, commits in enumerate(st["commits"]):
                timelines[i].update((t, c) for t, c in commits)
            if st["committed"] >= n:
                logger_cpu = sum(map(cpu_seconds, workers)) - cpu0
                db_cpu = cpu_seconds(server_pid) - db_cpu0 if server_pid else float("nan")
                break
            if logger.poll() is not None:
                raise RuntimeError(f"the event logger exited; see {log.name}")
            time.sleep(0.02)
        send_times = sorted(t for p in senders for t in json.loads(p.stdout.readline()))
        marks = sorted((t, c) for tl in timelines.values() for t, c in tl.items())
        if servers > 1:  # running totals per server → one running total
            acc, last, marks = 0, {}, []
            for t, i, c in sorted((t, i, c) for i, tl in timelines.items() for t, c in tl.items()):
                acc += c - last.get(i, 0)
                last[i] = c
                marks.append((t, acc))
        end = marks[-1][0]
        stored = client[db_name].event.count_documents({})
        assert stored == n, f"{stored} events stored, {n} sent"
        elapsed = end - t0
        lo = next(t for t, c in marks if c >= 0.1 * n)
        hi = next(t for t, c in marks if c >= 0.9 * n)
        lat = sorted(latencies(send_times, timelines))
        return {"rate": n / elapsed, "steady": 0.8 * n / max(hi - lo, 1e-9),
                "seconds": elapsed, "events": len(lat), "lat_median": statistics.median(lat),
                "lat_p99": lat[max(0, int(len(lat) * 0.99) - 1)],
                "logger_us": logger_cpu / n * 1e6, "server_us": db_cpu / n * 1e6}
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
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]),
                    sys.argv[6:8] or None)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--event-servers", type=int, default=1,
                    help="num_event_servers of the logger (default 1)")
    ap.add_argument("--batch", type=int, default=10000,
                    help="insert_many batch of the ceiling (default: the logger's largest)")
    ap.add_argument("--load", type=float, default=0.5,
                    help="paced load for the latency phase, as a fraction of the ceiling")
    ap.add_argument("--paced-seconds", type=float, default=6.0)
    servers.add_argument(ap)
    ap.add_argument("--no-curve", action="store_true", help="skip the CURVE runs")
    args = ap.parse_args()
    chosen = servers.chosen(args)
    figures = {server.label: measure(server, args) for server in chosen}
    servers.side_by_side(f"bench/ingest.py: {args.events} events, {args.clients} clients, "
                         f"{args.event_servers} event server(s), medians of {args.runs} runs",
                         chosen, figures)
    return 0


def measure(server: servers.Server, args) -> dict[str, str]:
    """Every figure on one database server."""
    uri = server.uri
    client = pymongo.MongoClient(uri)
    servers.heading(server, f"{args.events} events, {args.clients} clients, "
                    f"{args.event_servers} event server(s), ceiling batches of {args.batch}, "
                    f"{args.runs} runs, {os.cpu_count()} cores")
    key_dir = tempfile.mkdtemp(prefix="zbench-keys-")
    keys = None if args.no_curve else make_keys(key_dir)
    ceilings, runs, paced, curve, curve_paced = [], [], [], [], []
    port = pymongo.uri_parser.parse_uri(uri)["nodelist"][0][1]
    db_pid = listening_pid(port)  # None: a server elsewhere, or ss cannot say
    # Ceilings that warm the server up are not counted (the java server's JIT: the
    # first run of inserts was measured 3x slower than the next, and a JVM started
    # minutes before gave 19,000/s in one run and 100,000-140,000 in the others): until
    # two in a row agree within WARM, at most WARMUPS.  The paced runs use the median
    # of the ceilings measured before them.
    last = ceiling(client, args.events, args.batch)
    for _ in range(WARMUPS - 1):
        rate = ceiling(client, args.events, args.batch)
        if abs(rate - last) <= WARM * max(rate, last):
            break
        last = rate
    for i in range(args.runs):
        c = ceiling(client, args.events, args.batch)
        r = logger_run(client, uri, args.events, args.clients, args.event_servers,
                       server_pid=db_pid)
        ceilings.append(c)
        rate = args.load * statistics.median(ceilings)
        p = logger_run(client, uri, int(rate * args.paced_seconds), args.clients,
                       args.event_servers, rate)
        runs.append(r)
        paced.append(p)
        print(f"run {i + 1}: ceiling {c:,.0f}/s; logger {r['rate']:,.0f}/s end to end "
              f"({r['seconds']:.2f} s), {r['steady']:,.0f}/s steady; ratio {r['rate'] / c:.2f}; "
              f"burst latency median {r['lat_median']:.2f} s; CPU per event: logger "
              f"{r['logger_us']:.1f} us, server {r['server_us']:.1f} us; at {rate:,.0f}/s latency "
              f"median {p['lat_median'] * 1000:.0f} ms, p99 {p['lat_p99'] * 1000:.0f} ms",
              flush=True)
        if keys:
            rc = logger_run(client, uri, args.events, args.clients, args.event_servers,
                            keys=keys)
            pc = logger_run(client, uri, int(rate * args.paced_seconds), args.clients,
                            args.event_servers, rate, keys=keys)
            curve.append(rc)
            curve_paced.append(pc)
            print(f"run {i + 1} CURVE: logger {rc['rate']:,.0f}/s end to end, "
                  f"{rc['steady']:,.0f}/s steady; CURVE / plain {rc['rate'] / r['rate']:.2f}; "
                  f"at {rate:,.0f}/s latency median {pc['lat_median'] * 1000:.0f} ms, "
                  f"p99 {pc['lat_p99'] * 1000:.0f} ms", flush=True)
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("rate", "steady", "logger_us", "server_us")}
    lat = {k: statistics.median(p[k] for p in paced) for k in ("lat_median", "lat_p99")}
    ceil = statistics.median(ceilings)
    ratio = statistics.median(r["rate"] / c for r, c in zip(runs, ceilings))
    print(f"median of {args.runs}: ceiling {ceil:,.0f} events/s; logger {med['rate']:,.0f} "
          f"events/s end to end = {med['rate'] / ceil:.2f}x the ceiling (median of the runs' "
          f"ratios {ratio:.2f}; target >= 0.9); "
          f"steady {med['steady']:,.0f}/s = {med['steady'] / ceil:.2f}x; latency send->stored "
          f"at {args.load:g}x the ceiling: median {lat['lat_median'] * 1000:.0f} ms, "
          f"p99 {lat['lat_p99'] * 1000:.0f} ms; CPU per event (flat out): logger "
          f"{med['logger_us']:.1f} us, server {med['server_us']:.1f} us")
    figures = {"ceiling: insert_many batches": f"{ceil:,.0f} events/s",
               "logger, end to end": f"{med['rate']:,.0f} events/s {med['rate'] / ceil:.2f}x",
               "logger, steady (10% -> 90%)": f"{med['steady']:,.0f} events/s",
               f"latency median at {args.load:g}x ceiling": f"{lat['lat_median'] * 1000:.0f} ms",
               f"latency p99 at {args.load:g}x ceiling": f"{lat['lat_p99'] * 1000:.0f} ms",
               "CPU per event: logger processes": f"{med['logger_us']:.1f} us",
               "CPU per event: database server": f"{med['server_us']:.1f} us"}
    if curve:
        cmed = statistics.median(r["rate"] for r in curve)
        cratio = statistics.median(rc["rate"] / r["rate"] for rc, r in zip(curve, runs))
        clat = {k: statistics.median(p[k] for p in curve_paced)
                for k in ("lat_median", "lat_p99")}
        print(f"median of {args.runs}: CURVE logger {cmed:,.0f} events/s end to end = "
              f"{cmed / med['rate']:.2f}x plain (median of the runs' ratios {cratio:.2f}; "
              f"target >= 0.8); latency median {clat['lat_median'] * 1000:.0f} ms, "
              f"p99 {clat['lat_p99'] * 1000:.0f} ms")
        figures["CURVE logger, end to end"] = f"{cmed:,.0f} events/s"
        figures["CURVE / plain"] = f"{cratio:.2f}x"
    shutil.rmtree(key_dir, ignore_errors=True)
    client.close()
    return figures


if __name__ == "__main__":
    sys.exit(main())
