#!/usr/bin/env python3
"""Benchmark the map-reduce cluster against a plain one-process count.

N event documents (SPEC §3 shape) are counted per (type, day) key:

* baseline: one process, a pymongo cursor and a dict;
* zmr with 1 worker process and with 2: a router and a pool started here (own
  ports, own job root), one ``mapreduce`` job each run, timed from submit to
  completion, output checked against the baseline's counts;
* the same with CURVE: a second router whose sockets are CURVE servers, its workers
  and the bench's client authorised CURVE clients (keys made for the run), for the
  ratio CURVE / plain (target >= 0.8); ``--no-curve`` skips it.

Each is run ``--runs`` times; the median documents/s and the ratio to the
baseline are printed, then the router's peak RSS (VmHWM).  The whole is done
twice: with a cheap map, and with a map that burns about 20 µs of CPU per
document.  ``--rss-n M`` adds one 2-worker run over M documents, for the
router's peak RSS at that size.

Usage: ``python bench/zmr.py [--n 200000] [--runs 3] [--rss-n 1000000]``; the
database is ``$ZARKOV_TEST_MONGO_URI`` or the bundled one (``scripts/dev-db
start``).  A database of its own is created and dropped.
"""
from __future__ import annotations

import argparse
import datetime as dt
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

from zarkov import keys as K  # noqa: E402
from zarkov import wire  # noqa: E402
from zarkov.security import ClientKeys  # noqa: E402
from zarkov.zmr import client  # noqa: E402

TYPES = ("login", "download", "create", "view", "upload", "comment")

MAP = '''
def map_type_day(objects):
    for o in objects:
        t = o["timestamp"]
        yield {"type": o["type"], "day": "%04d-%02d-%02d" % (t.year, t.month, t.day)}, 1
'''

COSTLY_MAP = '''
def map_type_day(objects):
    for o in objects:
        x = 0
        for i in range(SPIN):  # about 20 us of CPU per document
            x += i
        t = o["timestamp"]
        yield {"type": o["type"], "day": "%04d-%02d-%02d" % (t.year, t.month, t.day)}, 1
'''

REDUCE = '''
def count(key, values):
    return sum(values)
'''


def spin_for(us: float) -> int:
    """Loop count of COSTLY_MAP's inner loop that takes about ``us`` microseconds."""
    n = 1000
    t0 = time.perf_counter()
    for _ in range(200):
        x = 0
        for i in range(n):
            x += i
    per = (time.perf_counter() - t0) / 200
    return max(1, int(n * us / 1e6 / per))


def event(i: int, base: dt.datetime) -> dict:
    """One event of SPEC §3's shape, spread over 30 days."""
    return {"timestamp": base + dt.timedelta(seconds=(i * 7919) % (30 * 86400)),
            "type": TYPES[i % len(TYPES)],
            "context": {"user": f"user{i % 997}", "project": f"project{i % 101}",
                        "neighborhood": "projects", "tool": "wiki", "mount_point": "wiki",
                        "is_project_member": i % 3 == 0},
            "extra": {"seq": i, "path": f"/p/project{i % 101}/wiki/Page{i % 53}/"}}


def fill(coll, n: int) -> None:
    base = dt.datetime(2024, 1, 1)
    have = coll.estimated_document_count()
    for start in range(have, n, 10000):
        coll.insert_many([event(i, base) for i in range(start, min(n, start + 10000))],
                         ordered=False)


def load(text: str, name: str):
    ns: dict = {}
    exec(text, ns)
    return ns[name]


def baseline(coll, map_text: str) -> tuple[float, dict]:
    """One process: cursor + dict.  Returns (seconds, counts)."""
    fn = load(map_text, "map_type_day")
    t0 = time.perf_counter()
    counts: dict = {}
    for key, v in fn(coll.find()):
        k = (key["type"], key["day"])
        counts[k] = counts.get(k, 0) + v
    return time.perf_counter() - t0, counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Cluster:
    """A router and (re)startable worker pools of the bench's own; with ``curve``,
    every socket is CURVE (the workers and the bench's client use a client key)."""

    def __init__(self, uri: str, database: str, tmp: str, curve: bool = False):
        os.makedirs(tmp, exist_ok=True)
        port = free_port()
        self.label = "CURVE" if curve else "plain"
        self.req_uri = f"tcp://127.0.0.1:{port}"
        cfg = {"mongo_uri": uri, "mongo_database": database,
               "zmr": {"req_uri": self.req_uri, "req_bind": self.req_uri,
                       "worker_uri": "tcp://127.0.0.1", "job_root": os.path.join(tmp, "jobs")}}
        self.keys = None
        if curve:
            server_public, server_secret = K.new_key_pair(tmp, "server")
            client_public, client_secret = K.new_key_pair(tmp, "client")
            K.authorize(client_public, os.path.join(tmp, "authorized"))
            cfg["security"] = {"server_key": server_secret,
                               "authorized_keys": os.path.join(tmp, "authorized")}
            self.keys = ClientKeys.load(server_public, client_secret)
        self.path = os.path.join(tmp, "zarkov.yaml")
        with open(self.path, "w") as f:
            yaml.safe_dump(cfg, f)
        self.worker_path = self.path
        if curve:  # workers connect as a client host would, with their own key
            self.worker_path = os.path.join(tmp, "worker.yaml")
            with open(self.worker_path, "w") as f:
                yaml.safe_dump({**cfg, "security": {"server_public_key": server_public,
                                                    "client_key": client_secret}}, f)
        self.log = open(os.path.join(tmp, "cluster.log"), "ab")
        self.router = self._zcmd("zmr-router")
        self.pool = None
        self.sock = wire.req_socket(self.req_uri, keys=self.keys)
        self._wait(lambda: client.call(self.sock, {"$command": "echo"}, 2), "router")

    def _zcmd(self, *args: str, path: str | None = None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "zcmd"),
                                 "-y", path or self.path, *args], stdout=self.log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def _wait(self, cond, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if cond():
                    return
            except wire.WireError:
                self.sock.close(0)
                self.sock = wire.req_socket(self.req_uri, keys=self.keys)
            time.sleep(0.1)
        raise SystemExit(f"bench: no {what} after {timeout} s; see the cluster log")

    def workers(self, n: int) -> None:
        self.stop_pool()
        self.pool = self._zcmd("zmr-worker", "-n", str(n), path=self.worker_path)
        self._wait(lambda: client.call(self.sock, {"$command": "status"}, 2)["workers"] == n,
                   f"{n} workers")

    def stop_pool(self) -> None:
        if self.pool is not None:
            self.pool.send_signal(signal.SIGTERM)
            self.pool.wait(30)
            # Wait until the router has stopped counting the old processes.
            self._wait(lambda: client.call(self.sock, {"$command": "status"}, 2)["workers"] == 0,
                       "old workers to go")
            self.pool = None

    def run(self, database: str, map_text: str) -> float:
        req = {"$command": "mapreduce", "database": database, "input_names": ["event"],
               "map_text": map_text, "map_name": "map_type_day",
               "reduce_text": REDUCE, "reduce_name": "count", "output_name": "zagg.bench"}
        t0 = time.perf_counter()
        client.run(self.sock, req, timeout=3600)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.stop_pool()
        try:
            client.call(self.sock, {"$command": "terminate"}, 5)
            self.router.wait(15)
        except (wire.WireError, subprocess.TimeoutExpired):
            self.router.kill()
        self.sock.close(0)


def output_counts(db) -> dict:
    return {(d["_id"]["type"], d["_id"]["day"]): d["value"] for d in db["zagg.bench"].find()}


def series(label: str, n: int, runs: int, db, clusters: list[Cluster], map_text: str) -> None:
    print(f"\n{label} map, N={n}, median of {runs} runs:", flush=True)
    base = []
    for _ in range(runs):
        secs, want = baseline(db.event, map_text)
        base.append(secs)
    b = n / statistics.median(base)
    print(f"  baseline (1 process)  {b:10,.0f} docs/s", flush=True)
    for procs in (1, 2):
        for cluster in clusters:
            cluster.workers(procs)
        # Why alternate: on a shared machine the load drifts; runs of the two clusters
        # taken in turn see the same drift, and the per-run ratios cancel it.
        times: dict[str, list[float]] = {c.label: [] for c in clusters}
        for _ in range(runs):
            for cluster in clusters:
                times[cluster.label].append(cluster.run(db.name, map_text))
                if output_counts(db) != want:
                    raise SystemExit("bench: zmr output differs from the baseline's counts")
        for cluster in clusters:
            cluster.stop_pool()
        plain = times[clusters[0].label]
        plain_rate = n / statistics.median(plain)
        for cluster in clusters:
            mine = times[cluster.label]
            r = n / statistics.median(mine)
            vs_plain = ""
            if cluster is not clusters[0]:
                ratio = statistics.median(p / m for p, m in zip(plain, mine))
                vs_plain = (f"   {r / plain_rate:5.2f}x plain (median of the runs' ratios "
                            f"{ratio:.2f}; target >= 0.8)")
            print(f"  zmr {cluster.label:5}, {procs} worker process{'es' if procs > 1 else '  '}"
                  f" {r:10,.0f} docs/s   {r / b:5.2f}x baseline{vs_plain}", flush=True)
    print(f"  router peak RSS so far: {peak_rss_mb(clusters[0].router.pid):.0f} MB", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200000, help="event documents (default 200000)")
    p.add_argument("--runs", type=int, default=3, help="runs per figure (median; default 3)")
    p.add_argument("--rss-n", type=int, default=0,
                   help="also one 2-worker run over this many documents for the router's RSS")
    p.add_argument("--cheap-only", action="store_true", help="skip the costly map")
    p.add_argument("--no-curve", action="store_true", help="skip the CURVE cluster")
    args = p.parse_args()
    # A timeout's SIGTERM must still stop the router and workers started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    uri = os.environ.get("ZARKOV_TEST_MONGO_URI") or subprocess.run(
        [os.path.join(ROOT, "scripts", "dev-db"), "start"], capture_output=True, text=True,
        check=True).stdout.split()[-1]
    mc = pymongo.MongoClient(uri)
    name = "zbench_" + uuid.uuid4().hex[:8]
    db = mc[name]
    tmp = tempfile.mkdtemp(prefix="zmr-bench-")
    clusters: list[Cluster] = []
    try:
        t0 = time.perf_counter()
        fill(db.event, args.n)
        size = len(bson.encode(event(0, dt.datetime(2024, 1, 1))))
        print(f"inserted {args.n} events in {time.perf_counter() - t0:.1f} s "
              f"(about {size} bytes each)", flush=True)
        clusters.append(Cluster(uri, name, os.path.join(tmp, "plain")))
        if not args.no_curve:
            clusters.append(Cluster(uri, name, os.path.join(tmp, "curve"), curve=True))
        series("cheap", args.n, args.runs, db, clusters, MAP)
        if not args.cheap_only:
            spin = spin_for(20.0)
            series(f"costly (~20 us/doc, {spin} loop turns)", args.n, args.runs, db, clusters,
                   COSTLY_MAP.replace("SPIN", str(spin)))
        if args.rss_n > args.n:
            fill(db.event, args.rss_n)
            clusters[0].workers(2)
            secs = clusters[0].run(name, MAP)
            print(f"\nN={args.rss_n}: zmr 2 workers {args.rss_n / secs:,.0f} docs/s; "
                  f"router peak RSS {peak_rss_mb(clusters[0].router.pid):.0f} MB", flush=True)
    finally:
        for cluster in clusters:
            cluster.close()
        mc.drop_database(name)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
