"""No task waits for its time limit when worker processes come and go (issue 15).

A real router and pool, worker processes recycling themselves every few tasks, and
several clients each running one small job after another at once, as the real-time
runs of ten AggDefs do; and a worker process SIGKILLed while it runs a task.  A task
whose worker process is gone must go out again within about a second, never after
``max_chunk_timeout``.
"""
from __future__ import annotations

import collections
import os
import signal
import threading
import time

import bson

from tests.fixtures import zmr_functions as F
from tests.support import Cluster, child_asleep, wait_for
from zarkov import wire
from zarkov.zmr import client

CLIENTS = 10            # like the real-time runs of 10 AggDefs
JOBS_PER_CLIENT = 40    # 400 one-task jobs in all
CAP = 30                # max_chunk_timeout: a task waiting for it would show
JOB_SECONDS = 5.0       # what any one of these jobs may take, recycling included


def test_many_one_task_jobs_while_workers_recycle_every_few_tasks(procs, config_file, db):
    cluster = Cluster(procs, config_file(zmr={"requests_per_worker_process": 5,
                                              "max_chunk_timeout": CAP})).start()
    db.event.insert_many([{"s": f"s{i % 7}"} for i in range(21)])
    want = {f"s{i}": 3 for i in range(7)}
    done: list[tuple[float, dict]] = []
    failures: list[BaseException] = []
    deadline = time.monotonic() + 240  # a bound should the machine crawl; ~20 s expected

    def runs(c: int) -> None:
        sock = wire.req_socket(cluster.uri)
        try:
            for _ in range(JOBS_PER_CLIENT):
                if time.monotonic() > deadline:
                    raise AssertionError("the jobs took far too long")
                t0 = time.monotonic()
                st = client.run(sock, client.mapreduce_request(
                    F.map_by_s, F.reduce_sum, database=db.name, output_name=f"zagg.c{c}",
                    inline_max=1 << 16), timeout=3 * CAP)
                done.append((time.monotonic() - t0, st))
        except BaseException as e:  # noqa: BLE001 - reported by the test's thread
            failures.append(e)
        finally:
            sock.close(0)

    threads = [threading.Thread(target=runs, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]
    assert len(done) == CLIENTS * JOBS_PER_CLIENT
    for _seconds, st in done:
        assert st["state"] == "complete", st.get("traceback")
        assert st["chunks_total"] == 1 and st["write_path"] == "inline"
        assert {d["_id"]: d["value"] for d in bson.decode_all(st["inline"][0]["docs"])} == want
        assert st["resent_for_time_limit"] == 0, st
    slowest = max(seconds for seconds, _ in done)
    assert slowest < JOB_SECONDS, f"a job took {slowest:.1f} s"
    status = cluster.status()
    assert status["tasks_resent_for_time_limit"] == 0
    assert "not answered in" not in procs.log("router")
    # the processes did recycle, many times, and their goodbyes cost nothing
    recycled = procs.log("worker").count("recycled after")
    assert recycled >= CLIENTS * JOBS_PER_CLIENT // 5 // 2, recycled
    assert status["tasks_resent_lost"] == 0 and status["errors"] == 0


def test_a_task_of_a_sigkilled_worker_goes_out_again_at_once(procs, config_file, db):
    cluster = Cluster(procs, config_file(zmr={"max_chunk_timeout": 60})).start()
    db.event.insert_many([{"s": f"s{i % 7}"} for i in range(70)])
    sock = wire.req_socket(cluster.uri)
    try:
        job = client.submit(sock, client.mapreduce_request(
            F.map_slow, F.reduce_sum, database=db.name, output_name="zagg.k"))
        victim = wait_for(lambda: child_asleep(cluster.workers.pid), timeout=30,
                          interval=0.02, what="a worker process inside the map")
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        st = client.wait(sock, [job], timeout=60)[job]
        took = time.monotonic() - killed
    finally:
        sock.close(0)
    assert st["state"] == "complete"
    assert (st["resent_lost"], st["resent_for_time_limit"]) == (1, 0)
    # sent again within about a second, then mapped again (0.8 s): far from 60 s
    assert took < 5, took
    assert {d["_id"]: d["value"] for d in db["zagg.k"].find()} == \
        dict(collections.Counter(f"s{i % 7}" for i in range(70)))
    assert "went away" in procs.log("router")

