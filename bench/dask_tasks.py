#!/usr/bin/env python3
"""Where a Dask job's time goes: its tasks, per worker, from Dask's task stream.

Runs the cheap count of ``bench/zmr.py`` (per type and day, ``--n`` events that are
not logged, so the input is the filter ``{}``) as a Dask job straight from this
process (``DaskJob.run``, no gateway) on a LocalCluster of ``--workers`` processes of
one thread each, ``--runs`` times; prints each job's seconds and the median's ratio
to the one-process pymongo + dict count of ``bench/zmr.py`` on the same data, then
every task of the last one: its key, worker, action (compute, transfer), start, stop and duration in
seconds from the job's start.  The figures behind docs/dask-engine.md "Benchmark".
Usage: ``python bench/dask_tasks.py [--server java] [--n 100000] [--workers 2]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pymongo
import servers
import zmr as Z

from zarkov.dask_engine.job import DaskJob
from zarkov.zmr.jobspec import JobSpec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    servers.add_argument(p)
    p.add_argument("--n", type=int, default=100000, help="events (default 100000)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--runs", type=int, default=4, help="jobs; the last one is shown")
    args = p.parse_args()
    from distributed import Client, LocalCluster
    for server in servers.chosen(args):
        servers.heading(server, f"one Dask job of {args.n} documents, "
                                f"{args.workers} workers")
        client = pymongo.MongoClient(server.uri)
        db = client.zbench_dask_tasks
        try:
            db.event.drop()
            Z.fill(db.event, args.n)
            fns = {"map": [Z.MAP, "map_type_day"], "reduce": [Z.REDUCE, "count"]}
            spec = JobSpec(kind="mapreduce", fns=fns, database=db.name,
                           input_names=["event"], output_name="zagg.bench")
            with LocalCluster(n_workers=args.workers, threads_per_worker=1,
                              dashboard_address=":0") as cluster, \
                    Client(cluster, set_as_default=False) as dask:
                seconds, stream, t0 = [], [], 0.0
                for _ in range(args.runs):
                    t0 = time.time()
                    job = DaskJob(spec, lambda: dask, server.uri, client, 1 << 20, 2, "local")
                    job.run()
                    seconds.append(time.time() - t0)
                    if job.info["state"] != "complete":
                        print(job.info.get("traceback"))
                        return 1
                    stream = dask.get_task_stream(start=t0)
                base, _ = Z.baseline(db.event, Z.MAP)
                job_s = statistics.median(seconds)
                print("jobs: " + ", ".join(f"{s:.3f}" for s in seconds)
                      + f" s (median {job_s:.3f} s); one-process baseline {base:.3f} s: "
                      f"the job runs at {base / job_s:.2f}x its speed")
                print(f"  {'task':24s} {'worker':>8s} {'action':8s} {'start':>6s} "
                      f"{'stop':>6s} {'secs':>6s}")
                rows = [(ss["start"] - t0, ss["stop"] - t0, t["key"], t["worker"], ss["action"])
                        for t in stream for ss in t["startstops"]]
                for start, stop, key, worker, action in sorted(rows):
                    print(f"  {key.split('-')[0]:24s} {worker.rsplit(':', 1)[-1]:>8s} "
                          f"{action:8s} {start:6.3f} {stop:6.3f} {stop - start:6.3f}")
        finally:
            client.drop_database(db.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
