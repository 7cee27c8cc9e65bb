"""No loop dies while its process lives: an unexpected exception costs one message (logged
with its traceback, counted, the message kept), and a loop that dies anyway ends its
process with status 70 so that a supervisor restarts it.

The failures are injected with ``ZARKOV_FAULTS`` (:mod:`zarkov.faults`) into real
processes; a marked message is the one that fails.
"""
from __future__ import annotations

import os
import signal

import bson

from tests.eventlog_util import load, push, seqs, stats
from tests.support import Cluster, router_status, wait_for
from zarkov import wire
from zarkov.errors import EXIT_LOOP_DIED
from zarkov.faults import MARK

MARKED = {"type": "marked", "extra": MARK.decode()}


def faults(spec: str) -> dict:
    return {"ZARKOV_FAULTS": spec}


def good(first: int, n: int) -> list[dict]:
    return [{"type": "ok", "extra": {"seq": i}} for i in range(first, first + n)]


def exit_status(p, timeout: float = 60) -> int:
    return wait_for(lambda: p.poll() is not None, timeout=timeout,
                    what="the process to exit") and p.returncode


def test_an_unexpected_error_costs_the_event_server_one_message(procs, config_file, db):
    path = config_file()
    cfg = load(path)
    p = procs.zcmd("eventlog", path, "eventlog", env=faults("eventlog.message"))
    wait_for(lambda: stats(cfg["journal"]).get("pid"), timeout=30, what="the event server")
    push(cfg["bson_bind_address"], good(0, 5) + [MARKED] + good(5, 5))
    wait_for(lambda: db.event.count_documents({}) == 10, what="the 10 good events stored")
    assert seqs(db.event) == list(range(10))
    s = wait_for(lambda: (s := stats(cfg["journal"]))["rejected"] == 1 and s,
                 what="the marked message rejected")
    assert s["errors"] == 1 and s["errors_by_loop"] == {"bson loop": 1}
    with open(os.path.join(cfg["journal"], "rejects.jsonl")) as f:
        assert "internal error: InjectedFault: fault injected at eventlog.message" in f.read()
    log = procs.log("eventlog")
    assert "bson loop: unexpected error on a message of" in log and "Traceback" in log
    push(cfg["bson_bind_address"], good(10, 5))  # and it goes on
    wait_for(lambda: db.event.count_documents({}) == 15, what="5 more events stored")
    assert p.poll() is None


def test_a_dead_receive_loop_ends_the_event_logger_with_status_70(procs, config_file, db):
    path = config_file()
    cfg = load(path)
    p = procs.zcmd("eventlog", path, "eventlog", env=faults("eventlog.message:die"))
    wait_for(lambda: stats(cfg["journal"]).get("pid"), timeout=30, what="the event server")
    push(cfg["bson_bind_address"], good(0, 5))
    wait_for(lambda: db.event.count_documents({}) == 5, what="the first events stored")
    push(cfg["bson_bind_address"], [MARKED])
    assert exit_status(p) == EXIT_LOOP_DIED
    log = procs.log("eventlog")
    assert "event server 0: bson loop died" in log and "LoopKilled" in log
    assert "exits with status 70" in log
    assert seqs(db.event) == list(range(5))  # what was accepted is kept


def test_an_event_server_whose_loop_died_is_started_again(procs, config_file, db):
    path = config_file(num_event_servers=2)
    cfg = load(path)
    journal = cfg["journal"]
    p = procs.zcmd("eventlog", path, "eventlog", env=faults("eventlog.message:die"))
    pids = wait_for(lambda: all(stats(journal, i).get("pid") for i in (0, 1))
                    and [stats(journal, i)["pid"] for i in (0, 1)], timeout=30,
                    what="two event servers")
    push(cfg["bson_bind_address"], [MARKED])
    wait_for(lambda: "exited with status 70; starting it again" in procs.log("eventlog"),
             timeout=60, what="the parent to restart the server whose loop died")
    wait_for(lambda: all(stats(journal, i).get("pid") for i in (0, 1))
             and [stats(journal, i)["pid"] for i in (0, 1)] != pids, timeout=30,
             what="the new event server")
    push(cfg["bson_bind_address"], good(0, 20))
    wait_for(lambda: db.event.count_documents({}) == 20, timeout=60, what="20 events stored")
    assert seqs(db.event) == list(range(20))
    assert p.poll() is None


def test_router_answers_a_request_whose_handling_failed_and_counts_it(procs, config_file):
    cluster = Cluster(procs, config_file())
    cluster.router = procs.zcmd("router", cluster.path, "zmr-router",
                                env=faults("router.request"))
    wait_for(lambda: wire.request(cluster.uri, {"$command": "echo"}, 1.0), timeout=30,
             what="the router")
    reply = wire.request(cluster.uri, {"$command": "echo", "x": MARK}, 10)
    assert reply["error"] == "internal error: InjectedFault: fault injected at router.request"
    status = router_status(cluster.uri)
    assert status["errors"] == 1 and status["errors_by_loop"] == {"request loop": 1}
    assert wire.request(cluster.uri, {"$command": "echo", "x": 1}, 10)["message"]["x"] == 1
    assert "request loop: unexpected error on 'echo'" in procs.log("router")


def test_a_dead_request_loop_ends_the_router_with_status_70(procs, config_file):
    path = config_file()
    uri = load(path)["zmr"]["req_uri"]
    p = procs.zcmd("router", path, "zmr-router", env=faults("router.loop:die"))
    wait_for(lambda: wire.request(uri, {"$command": "echo"}, 1.0), timeout=30, what="the router")
    sock = wire.req_socket(uri)
    sock.send(bson.encode({"$command": "echo", "x": MARK}))
    assert exit_status(p) == EXIT_LOOP_DIED
    sock.close(0)
    assert "router: request loop died" in procs.log("router")


def test_serve_exits_70_when_one_of_its_loops_dies(procs, config_file):
    path = config_file()
    cfg = load(path)
    p = procs.zcmd("serve", path, "serve", "--no-realtime", env=faults("router.loop:die"))
    uri = cfg["zmr"]["req_uri"]
    wait_for(lambda: wire.request(uri, {"$command": "echo"}, 1.0), timeout=60, what="serve")
    wait_for(lambda: stats(cfg["journal"]).get("pid"), timeout=30, what="its event logger")
    sock = wire.req_socket(uri)
    sock.send(bson.encode({"$command": "echo", "x": MARK}))
    assert exit_status(p) == EXIT_LOOP_DIED
    sock.close(0)
    log = procs.log("serve")
    assert "router: request loop died" in log and "serve: stopping" in log
    assert "worker pool stopped" in log and "event server 0 stopped" in log


def test_a_worker_loop_error_is_counted_and_the_worker_goes_on(procs, config_file):
    cluster = Cluster(procs, config_file(zmr={"max_chunk_timeout": 1}))
    cluster.start_router()
    cluster.workers = procs.zcmd("worker", cluster.path, "zmr-worker", env=faults("worker.loop"))
    wait_for(lambda: cluster.status(1.0)["workers"] == 2, timeout=30, what="2 workers")
    pids = sorted(cluster.status()["worker_pids"])
    request = {"$command": "basic", "func_text": "def f(x):\n    return x\n", "func_name": "f",
               "wait": True}
    failed = wire.request(cluster.uri, {**request, "args": [MARK]}, 60)
    assert failed["status"]["state"] == "error"
    assert "not answered after" in failed["status"]["traceback"]
    wait_for(lambda: cluster.status()["worker_errors"] >= 5, timeout=10,
             what="the workers to report their errors")
    done = wire.request(cluster.uri, {**request, "args": [41]}, 60)
    assert done["status"]["state"] == "complete" and done["status"]["result"] == 41
    assert sorted(cluster.status()["worker_pids"]) == pids  # the same processes
    assert "worker loop: unexpected error" in procs.log("worker")


def test_a_dead_pool_monitor_ends_zmr_worker_with_status_70(procs, config_file):
    path = config_file()
    p = procs.zcmd("worker", path, "zmr-worker", env=faults("pool.monitor:die"))
    assert exit_status(p) == EXIT_LOOP_DIED
    log = procs.log("worker")
    assert "worker pool monitor died" in log and "worker pool stopped" in log
    procs.kill(p, signal.SIGKILL)  # reaps the group: no worker process may be left


def test_a_busy_loop_lets_a_greenlet_woken_by_io_run_at_its_next_pause():
    # Why it matters: the event logger's receive loop pauses this way between
    # batches; its committer waits on the database's replies.  With gevent.sleep(0)
    # the reader waited for fifty rounds of the loop and 5 ms at least (gevent runs
    # queued callbacks that long before it polls I/O), and a burst of events
    # waited for its inserts.
    import gevent
    from gevent import socket

    from zarkov.runtime import loops

    a, b = socket.socketpair()
    got: list[bytes] = []
    reader = gevent.spawn(lambda: got.append(a.recv(1)))
    try:
        loops.let_others_run()  # the reader now waits on its socket
        assert not got
        b.sendall(b"x")
        rounds = 0
        while not got and rounds < 1000:
            rounds += 1
            loops.let_others_run()
        assert got == [b"x"] and rounds <= 2, f"the reader ran after {rounds} rounds"
    finally:
        reader.kill()
        a.close()
        b.close()
