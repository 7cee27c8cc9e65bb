"""Starting and stopping the cluster's processes: SIGTERM stops everything cleanly."""
from __future__ import annotations

import os
import signal

import yaml

from tests.support import children, wait_for
from zarkov import wire


def test_sigterm_stops_pool_children_and_router(procs, cluster):
    uri = yaml.safe_load(open(cluster))["zmr"]["req_uri"]
    router = next(p for name, p in procs.procs if name == "router")
    pool = next(p for name, p in procs.procs if name == "worker")
    kids = children(pool.pid)
    assert len(kids) == 2
    status = wire.request(uri, {"$command": "status"}, 5)
    assert sorted(status["worker_pids"]) == sorted(kids)

    pool.send_signal(signal.SIGTERM)
    assert pool.wait(20) == 0
    assert not any(os.path.exists(f"/proc/{k}") for k in kids)
    wait_for(lambda: wire.request(uri, {"$command": "status"}, 5)["workers"] == 0, timeout=30,
             what="the router to notice the workers are gone")

    router.send_signal(signal.SIGTERM)
    assert router.wait(20) == 0


def test_pool_replaces_a_killed_process_and_router_terminates_on_request(procs, cluster):
    uri = yaml.safe_load(open(cluster))["zmr"]["req_uri"]
    pool = next(p for name, p in procs.procs if name == "worker")
    router = next(p for name, p in procs.procs if name == "router")
    victim = children(pool.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(children(pool.pid)) == 2 and victim not in children(pool.pid),
             timeout=30, what="a replacement process")
    assert wire.request(uri, {"$command": "terminate"}, 5)["ok"]
    assert router.wait(20) == 0
