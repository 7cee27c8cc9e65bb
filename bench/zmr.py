#!/usr/bin/env python3
"""Benchmark the map-reduce cluster against a plain one-process count.

N event documents (the event logger's shape) are counted per (type, day) key:

* baseline: one process, a pymongo cursor and a dict;
* zmr with 1 worker process and with 2: a router and a pool started here (own
  ports, own job root), one ``mapreduce`` job each run, timed from submit to
  completion, output checked against the baseline's counts;
* the same with CURVE: a second router whose sockets are CURVE servers, its workers
  and the bench's client authorised CURVE clients (keys made for the run), for the
  ratio CURVE / plain (target >= 0.8); ``--no-curve`` skips it;
* the Dask engine (``--engine router,dask``, the default when Dask is installed): a
  ``dask scheduler``, ``dask worker`` with 1 and then 2 single-threaded worker
  processes, and the gateway (``python -m zarkov.dask_engine.gateway``) answering the
  same requests; its ratio to the router with as many workers (target on 2 cores:
  >= 0.9).

Each is run ``--runs`` times; the median documents/s and the ratio to the
baseline are printed, then the router's peak RSS (VmHWM).  With 2 workers, the CPU
per document of the coordinating processes is measured in the same runs (from
/proc/<pid>/stat): the router; the Dask scheduler and the gateway (the Dask client).
The whole is done twice: with a cheap map, and with a map that burns about 20 µs of
CPU per document.  ``--rss-n M`` adds one 2-worker run over M documents, for the
router's peak RSS at that size.

All of it runs on each server (``--server``, see bench/servers.py: both bundled
servers by default), then the figures are printed side by side, a column a server.

Usage: ``python bench/zmr.py [--server both] [--engine router,dask] [--n 200000]
[--runs 3] [--rss-n 1000000]``.
A database of its own is created and dropped on each server.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
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
from procstat import cpu_seconds, peak_rss_mb

from tests.support import free_port
from zarkov import keyfiles as K
from zarkov import wire
from zarkov.security import ClientKeys
from zarkov.zmr import jobclient

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
    """One event as the event logger stores it, spread over 30 days."""
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
        self.cpu: list[float] = []  # CPU seconds of the coordinating processes per run
        self.router = self._zcmd("zmr-router")
        self.pool = None
        self.sock = wire.req_socket(self.req_uri, keys=self.keys)
        self._wait(lambda: jobclient.call(self.sock, {"$command": "echo"}, 2), "router")

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
        self._wait(lambda: jobclient.call(self.sock, {"$command": "status"}, 2)["workers"] == n,
                   f"{n} workers")

    def stop_pool(self) -> None:
        if self.pool is not None:
            self.pool.send_signal(signal.SIGTERM)
            self.pool.wait(30)
            # Wait until the router has stopped counting the old processes.
            self._wait(lambda: jobclient.call(self.sock, {"$command": "status"}, 2)["workers"] == 0,
                       "old workers to go")
            self.pool = None

    def run(self, database: str, map_text: str) -> float:
        req = {"$command": "mapreduce", "database": database, "input_names": ["event"],
               "map_text": map_text, "map_name": "map_type_day",
               "reduce_text": REDUCE, "reduce_name": "count", "output_name": "zagg.bench"}
        pids = self.coordinators()
        cpu0 = sum(cpu_seconds(p) for p in pids)
        t0 = time.perf_counter()
        jobclient.run(self.sock, req, timeout=3600)
        secs = time.perf_counter() - t0
        self.cpu.append(sum(cpu_seconds(p) for p in pids) - cpu0)
        return secs

    def coordinators(self) -> list[int]:
        """The processes that coordinate jobs: the router."""
        return [self.router.pid]

    def close(self) -> None:
        self.stop_pool()
        try:
            jobclient.call(self.sock, {"$command": "terminate"}, 5)
            self.router.wait(15)
        except (wire.WireError, subprocess.TimeoutExpired):
            self.router.kill()
        self.sock.close(0)


class DaskBench(Cluster):
    """The Dask engine: a scheduler, restartable ``dask worker`` processes, and the
    gateway answering the router's protocol (so :meth:`Cluster.run` is the same)."""

    # Cluster.__init__ (a router) is not called: the gateway takes its place.
    def __init__(self, uri: str, database: str, tmp: str):
        os.makedirs(tmp, exist_ok=True)
        self.label = "dask"
        self.keys = None
        self.cpu = []
        self.req_uri = f"tcp://127.0.0.1:{free_port()}"
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.path = os.path.join(tmp, "zarkov.yaml")
        with open(self.path, "w") as f:
            yaml.safe_dump({"mongo_uri": uri, "mongo_database": database,
                            "zmr": {"req_uri": self.req_uri, "req_bind": self.req_uri,
                                    "engine": "dask", "dask_scheduler": self.address}}, f)
        self.log = open(os.path.join(tmp, "cluster.log"), "ab")
        bin_dir = os.path.dirname(sys.executable)
        self.dask = os.path.join(bin_dir, "dask")
        self.scheduler = self._start([self.dask, "scheduler", "--host", "127.0.0.1", "--port",
                                      self.address.rsplit(":", 1)[1], "--no-dashboard",
                                      "--no-show"])
        self.router = self._start([sys.executable, "-m", "zarkov.dask_engine.gateway", "-y",
                                   self.path])  # "router": what close() stops
        self.pool = None
        self.sock = wire.req_socket(self.req_uri)
        self._wait(lambda: jobclient.call(self.sock, {"$command": "status"}, 2)["connected"],
                   "Dask gateway")

    def _start(self, argv: list[str]) -> subprocess.Popen:
        return subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": ROOT})

    def workers(self, n: int) -> None:
        self.stop_pool()
        self.pool = self._start([self.dask, "worker", self.address, "--nworkers", str(n),
                                 "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"])
        self._wait(lambda: jobclient.call(self.sock, {"$command": "status"}, 10)["workers"] == n,
                   f"{n} Dask workers")

    def coordinators(self) -> list[int]:
        """The Dask scheduler and the gateway (the Dask client)."""
        return [self.scheduler.pid, self.router.pid]

    def close(self) -> None:
        super().close()
        self.scheduler.send_signal(signal.SIGTERM)
        try:
            self.scheduler.wait(15)
        except subprocess.TimeoutExpired:
            self.scheduler.kill()


def output_counts(db) -> dict:
    return {(d["_id"]["type"], d["_id"]["day"]): d["value"] for d in db["zagg.bench"].find()}


#: The issue's targets for 2 worker processes, as a ratio to the baseline.
TARGETS = {"cheap": 1.0, "costly": 1.5}


def series(label: str, n: int, runs: int, db, clusters: list[Cluster], map_text: str,
           figures: dict[str, str]) -> None:
    """One map: the baseline, then zmr with 1 and 2 worker processes on each cluster
    (plain, then CURVE), runs alternating; into ``figures``."""
    print(f"{label} map, N={n}, median of {runs} runs:", flush=True)
    base = []
    for _ in range(runs):
        secs, want = baseline(db.event, map_text)
        base.append(secs)
    b = n / statistics.median(base)
    name = label.split(" ")[0]
    figures[f"{name} map: baseline, 1 process"] = f"{b:,.0f} docs/s"
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
        workers = f"{procs} worker process{'es' if procs > 1 else ''}"
        for cluster in clusters:
            mine = times[cluster.label]
            r = n / statistics.median(mine)
            vs_plain = ""
            target = (f" (target >= {TARGETS[name]:g}x)"
                      if procs == 2 and name in TARGETS and cluster is clusters[0] else "")
            if cluster is clusters[0]:
                figures[f"{name} map: zmr, {workers}{target}"] = f"{r:,.0f} docs/s {r / b:.2f}x"
            else:
                ratio = statistics.median(p / m for p, m in zip(plain, mine))
                versus = "router" if cluster.label == "dask" else "plain"
                goal = 0.9 if cluster.label == "dask" else 0.8
                figures[f"{name} map: {cluster.label}, {workers}"
                        f"{f' (target >= {goal:g}x router)' if versus == 'router' else ''}"] = (
                    f"{r:,.0f} docs/s {r / b:.2f}x; {r / plain_rate:.2f}x {versus}")
                vs_plain = (f"   {r / plain_rate:5.2f}x {versus} (median of the runs' ratios "
                            f"{ratio:.2f}; target >= {goal:g})")
            print(f"  {cluster.label:9}, {procs} worker process{'es' if procs > 1 else '  '}"
                  f" {r:10,.0f} docs/s   {r / b:5.2f}x baseline{target}{vs_plain}", flush=True)
            if procs == 2:
                us = statistics.median(cluster.cpu[-runs:]) / n * 1e6
                who = "scheduler + gateway" if cluster.label == "dask" else "router"
                figures[f"{name} map: CPU/doc of the {cluster.label} {who}"] = f"{us:.2f} us"
                print(f"    CPU of the {who}: {us:.2f} us per document", flush=True)
    rss = peak_rss_mb(clusters[0].router.pid)
    figures["router peak RSS"] = f"{rss:.0f} MB"
    print(f"  router peak RSS so far: {rss:.0f} MB", flush=True)


def measure(server: servers.Server, args) -> dict[str, str]:
    """Every figure on one server."""
    servers.heading(server, f"N={args.n}, median of {args.runs} runs")
    mc = pymongo.MongoClient(server.uri)
    name = "zbench_" + uuid.uuid4().hex[:8]
    db = mc[name]
    tmp = tempfile.mkdtemp(prefix="zmr-bench-")
    clusters: list[Cluster] = []
    figures: dict[str, str] = {}
    try:
        t0 = time.perf_counter()
        fill(db.event, args.n)
        size = len(bson.encode(event(0, dt.datetime(2024, 1, 1))))
        secs = time.perf_counter() - t0
        figures["insert_many, batches of 10,000"] = f"{args.n / secs:,.0f} docs/s"
        print(f"inserted {args.n} events in {secs:.1f} s (about {size} bytes each)", flush=True)
        if "router" in args.engine:
            clusters.append(Cluster(server.uri, name, os.path.join(tmp, "plain")))
            if not args.no_curve:
                clusters.append(Cluster(server.uri, name, os.path.join(tmp, "curve"),
                                        curve=True))
        if "dask" in args.engine:
            clusters.append(DaskBench(server.uri, name, os.path.join(tmp, "dask")))
        series("cheap", args.n, args.runs, db, clusters, MAP, figures)
        if not args.cheap_only:
            series(f"costly (~20 us/doc, {args.spin} loop turns)", args.n, args.runs, db,
                   clusters, COSTLY_MAP.replace("SPIN", str(args.spin)), figures)
        if args.rss_n > args.n:
            fill(db.event, args.rss_n)
            clusters[0].workers(2)
            secs = clusters[0].run(name, MAP)
            rss = peak_rss_mb(clusters[0].router.pid)
            figures[f"N={args.rss_n}: zmr, 2 worker processes"] = f"{args.rss_n / secs:,.0f} docs/s"
            figures[f"N={args.rss_n}: router peak RSS"] = f"{rss:.0f} MB"
            print(f"N={args.rss_n}: zmr 2 workers {args.rss_n / secs:,.0f} docs/s; "
                  f"router peak RSS {rss:.0f} MB", flush=True)
    finally:
        for cluster in clusters:
            cluster.close()
        mc.drop_database(name)
        mc.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    servers.add_argument(p)
    p.add_argument("--n", type=int, default=200000, help="event documents (default 200000)")
    p.add_argument("--runs", type=int, default=3, help="runs per figure (median; default 3)")
    p.add_argument("--rss-n", type=int, default=0,
                   help="also one 2-worker run over this many documents for the router's RSS")
    p.add_argument("--cheap-only", action="store_true", help="skip the costly map")
    p.add_argument("--no-curve", action="store_true", help="skip the CURVE cluster")
    have_dask = all(importlib.util.find_spec(m) for m in ("dask", "distributed"))
    p.add_argument("--engine", default="router,dask" if have_dask else "router",
                   help="engines to measure, comma separated: router, dask "
                        "(default: both when Dask is installed)")
    args = p.parse_args()
    args.engine = [e for e in args.engine.split(",") if e]
    if not set(args.engine) <= {"router", "dask"} or not args.engine:
        p.error("--engine: router, dask or router,dask")
    # A timeout's SIGTERM must still stop the router and workers started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    chosen = servers.chosen(args)
    args.spin = spin_for(20.0)  # once: the same costly map on every server
    figures = {server.label: measure(server, args) for server in chosen}
    servers.side_by_side(f"bench/zmr.py: count per (type, day) of N={args.n} events, "
                         f"median of {args.runs} runs; ratio to the baseline on the same "
                         f"server", chosen, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
