"""The event logger keeps every accepted event: SIGKILL mid-commit, database down
(a private server of the kind under test, SIGKILLed and started again)."""
from __future__ import annotations

import os
import signal

import pymongo

from tests.eventlog_util import load, push, seqs, start_logger, stats, wait_accepted
from tests.support import wait_for
from zarkov import faults


def burst(first: int, n: int) -> list[dict]:
    """``n`` events numbered from ``first`` in ``extra.seq``."""
    return [{"type": "burst", "context": {"user": f"u{i % 50}", "project": "p"},
             "extra": {"seq": i, "pad": "x" * 40}} for i in range(first, first + n)]


def test_sigkill_before_everything_is_committed_then_restart_stores_each_event_once(
        procs, config_file, db):
    """SIGKILL with part of the journal stored: the committer pauses before the insert
    of the batch holding a marked event in the middle (without it, a fast server had
    stored every event before the kill, and the test proved nothing)."""
    path = config_file()
    cfg = load(path)
    p = start_logger(procs, path, env={"ZARKOV_FAULTS": "commit.insert:pause"})
    n = 20000
    events = burst(0, n)
    events[n // 2]["extra"]["mark"] = faults.MARK.decode()
    push(cfg["bson_bind_address"], events)
    wait_accepted(procs, p, cfg["journal"], n)
    wait_for(lambda: "zarkov-fault-pause commit.insert" in procs.log("eventlog"),
             what="the committer paused")
    procs.kill(p)  # SIGKILL: no flush, no goodbye
    stored = db.event.count_documents({})
    assert stored < n, "everything was committed before the kill: the test proves nothing"

    p2 = start_logger(procs, path, "eventlog2")
    wait_for(lambda: db.event.count_documents({}) >= n, timeout=90,
             what="the replayed journal committed")
    wait_for(lambda: stats(cfg["journal"]).get("backlog_files") == 0, what="no backlog")
    assert seqs(db.event) == list(range(n))
    s = stats(cfg["journal"])
    assert s["pid"] == p2.pid and s["committed"] >= n - stored
    assert "replaying" in procs.log("eventlog2")
    procs.kill(p2, signal.SIGTERM)
    assert p2.returncode == 0
    journal_files = [f for f in os.listdir(os.path.join(cfg["journal"], "server-0"))
                     if f.endswith(".jnl")]
    assert journal_files == [], journal_files


def test_events_sent_while_the_database_is_down_are_stored_once_it_is_back(
        procs, config_file, private_server):
    """The database SIGKILLed under the logger, the logger too, then both back."""
    database = private_server.start()
    path = config_file(mongo_uri=database.uri, mongo_database="zdown")
    cfg = load(path)
    client = pymongo.MongoClient(database.uri, serverSelectionTimeoutMS=5000)
    event = client.zdown.event
    try:
        p = start_logger(procs, path)
        push(cfg["bson_bind_address"], burst(0, 1000))
        wait_for(lambda: event.count_documents({}) == 1000, what="the first events stored")

        database.kill()  # SIGKILL: what it acknowledged must still be there
        push(cfg["bson_bind_address"], burst(1000, 1500))
        wait_accepted(procs, p, cfg["journal"], 2500)
        wait_for(lambda: stats(cfg["journal"]).get("db_ok") is False, timeout=30,
                 what="the logger to notice the database is down")
        procs.kill(p)  # SIGKILL while the database is down

        p2 = start_logger(procs, path, "eventlog2")
        push(cfg["bson_bind_address"], burst(2500, 1500))
        wait_accepted(procs, p2, cfg["journal"], 1500)

        database.start()
        wait_for(lambda: event.count_documents({}) >= 4000, timeout=60,
                 what="every event committed once the database is back")
        wait_for(lambda: stats(cfg["journal"]).get("backlog_files") == 0, what="no backlog")
        assert seqs(event) == list(range(4000))
        assert "cannot commit to the database" in procs.log("eventlog")
        assert "replaying" in procs.log("eventlog2")
    finally:
        client.close()


def test_a_killed_event_server_is_restarted_and_replays_its_journal(procs, config_file, db):
    path = config_file(num_event_servers=2)
    cfg = load(path)
    journal = cfg["journal"]
    parent = procs.zcmd("eventlog", path, "eventlog")
    wait_for(lambda: stats(journal, 0).get("pid") and stats(journal, 1).get("pid"),
             timeout=30, what="two event servers")
    n = 10000
    push(cfg["bson_bind_address"], burst(0, n))
    wait_for(lambda: stats(journal, 0)["accepted"] + stats(journal, 1)["accepted"] >= n,
             what="every event accepted")
    victim = stats(journal, 1)["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: stats(journal, 1).get("pid") not in (None, victim), timeout=30,
             what="the event server started again")
    wait_for(lambda: db.event.count_documents({}) >= n, timeout=60, what="every event stored")
    wait_for(lambda: stats(journal, 1).get("backlog_files") == 0, what="no backlog")
    assert seqs(db.event) == list(range(n))
    assert "event server 1 exited" in procs.log("eventlog")
    procs.kill(parent, signal.SIGTERM)
    assert parent.returncode == 0
