"""zcmd serve: the whole service in one command, real-time aggregation included."""
import collections
import json
import re
import signal
import socket
import time

import pytest

from tests import aggtools as A
from tests.support import run_zcmd, subscriber, wait_for
from zarkov import streams, wire
from zarkov.aggregation import positions
from zarkov.client import ZarkovClient


@pytest.fixture
def served(procs, config_file, zconfig):
    """A running `zcmd serve` with a 1 s real-time interval; yields (process, config)."""
    path = config_file(realtime_interval=1)
    proc = procs.zcmd("serve", path, "serve")
    wait_for(lambda: wire.request(zconfig["zmr"]["req_uri"], {"$command": "echo"}, 1.0),
             timeout=60, what="the router of zcmd serve")
    return proc, path


def test_realtime_aggdef_produces_its_aggregate_and_announces_it(served, zconfig, db, procs):
    proc, _ = served
    sub = subscriber(zconfig["publish_bind_address"])
    db.agg_def.insert_one({"name": "per_type", "object": "event", "realtime": True,
                           "task_name": "zarkov.examples.EventsPerTypePerDay"})
    client = ZarkovClient(zconfig["bson_uri"])
    sent = collections.Counter()
    for i in range(600):
        kind = ("login", "download", "create")[i % 3]
        client.event(kind, {"user": f"u{i % 7}"}, extra={"seq": i})
        sent[kind] += 1
    client.close()

    announced = 0

    def all_announced():
        nonlocal announced
        while sub.poll(100):
            msg = wire.decode(sub.recv())
            assert msg["$command"] == "agg_complete" and msg["name"] == "per_type"
            announced += msg["docs"]
        return announced >= 600
    wait_for(all_announced, timeout=120, what="agg_complete messages for 600 events")
    sub.close()

    counted = collections.Counter()
    for row in db["zagg.events_per_day"].find():
        counted[row["_id"]["type"]] += row["value"]
    assert counted == sent
    assert announced == 600
    # Counted by their positions: the AggDef's position is the stream's bound, and
    # nothing was written to the events.
    (stream, bound), = streams.bounds(db, "event").items()
    assert bound == 600
    assert db.agg_position.find_one({"_id": "per_type"})["streams"] == {stream: 600}
    assert db.event.count_documents({"aggregates": {"$exists": True}}) == 0

    procs.kill(proc, signal.SIGTERM)
    assert proc.returncode == 0, procs.log("serve")[-2000:]


def test_a_failing_realtime_task_is_logged_and_serve_keeps_serving(served, zconfig, db, procs):
    proc, _ = served
    db.agg_def.insert_one({"name": "broken", "realtime": True, "task_name": "no.such.module.Task"})
    client = ZarkovClient(zconfig["bson_uri"])
    client.event("login", {"user": "u"})
    client.close()
    wait_for(lambda: "no.such.module" in procs.log("serve"), timeout=60,
             what="the bad task_name in the log")
    wait_for(lambda: db.event.count_documents({}) == 1, timeout=30, what="the event stored")
    echo = wire.request(zconfig["zmr"]["req_uri"], {"$command": "echo", "x": 1}, 5.0)
    assert echo["message"]["x"] == 1
    assert proc.poll() is None


@pytest.mark.parametrize("servers", [1, 2])
def test_an_event_is_counted_within_seconds_however_long_the_interval(
        procs, config_file, zconfig, db, servers):
    """The event logger tells the real-time loop when it has committed events: with
    realtime_interval 60, an event sent to serve is counted in a few seconds, the
    event servers being in this process or in child processes."""
    path = config_file(realtime_interval=60, num_event_servers=servers)
    db.agg_def.insert_one({"name": "per_type", "object": "event", "realtime": True,
                           "task_name": "zarkov.examples.EventsPerTypePerDay"})
    proc = procs.zcmd("serve", path, "serve", "--no-web")
    wait_for(lambda: wire.request(zconfig["zmr"]["req_uri"], {"$command": "echo"}, 1.0),
             timeout=60, what="the router of zcmd serve")
    # The loop's first run (nothing to take) is over once the status says so.
    wait_for(lambda: db.agg_status.find_one({"_id": "per_type", "last": {"$ne": None}}),
             timeout=60, what="the first real-time run")

    def counted() -> int:
        return sum(d["value"] for d in db["zagg.events_per_day"].find())

    client = ZarkovClient(zconfig["bson_uri"])
    try:
        for round_ in range(1, 4):  # each event alone: every one is news
            client.event("login", {"user": f"u{round_}"})
            # Well under the 60 s a loop on its interval would take, with room for a
            # loaded machine.
            wait_for(lambda: counted() == round_, timeout=15,  # noqa: B023 - waited for here
                     what=f"event {round_} counted in zagg.events_per_day")
    finally:
        client.close()
    procs.kill(proc, signal.SIGTERM)
    assert proc.returncode == 0, procs.log("serve")[-2000:]


def test_ten_realtime_aggdefs_over_one_stream_and_a_cron_run_beside_them(
        procs, config_file, zconfig, db):
    """10 real-time AggDefs over the logger's one stream, events arriving all the while,
    and `zcmd aggregate` of one of them run beside the loop: each counts every event
    once, and no map-reduce task waited for its time limit."""
    path = config_file(realtime_interval=60, zmr={"max_chunk_timeout": 30})
    names = [f"rt{k}" for k in range(10)]
    db.agg_def.insert_many([{"name": n, "object": "event", "realtime": True,
                             "task_name": "my.named.PerName"} for n in names])
    proc = procs.zcmd("serve", path, "serve", "--no-web", env=A.ENV)
    wait_for(lambda: db.agg_status.count_documents({"last": {"$ne": None}}) == 10,
             timeout=90, what="the first runs of the 10 AggDefs")
    sent = collections.Counter()
    client = ZarkovClient(zconfig["bson_uri"])
    cron = None
    try:
        for i in range(3000):
            kind = ("login", "download", "create")[i % 3]
            client.event(kind, {"user": f"u{i % 7}"})
            sent[kind] += 1
            if i % 100 == 99:
                time.sleep(0.05)  # a steady flow over a few seconds, not one burst
            if i == 1500:
                cron = procs.zcmd("cron", path, "aggregate", "rt3", "--wait", env=A.ENV)
    finally:
        client.close()
    assert cron.wait(120) == 0, procs.log("cron")

    def all_counted():
        return all(positions.waiting(db, n) == 0 for n in names) and \
            sum(streams.bounds(db, "event").values()) == 3000
    wait_for(all_counted, timeout=120, what="every AggDef to count the 3000 events")
    for n in names:
        assert {d["_id"]: d["value"] for d in db[f"zagg.{n}"].find()} == dict(sent), n
    assert "sending it again" not in procs.log("serve")
    procs.kill(proc, signal.SIGTERM)
    assert proc.returncode == 0, procs.log("serve")[-2000:]


def test_zcmd_status_shows_the_service_and_fails_once_it_is_down(served, zconfig, db, procs):
    proc, path = served
    db.agg_def.insert_one({"name": "per_type", "object": "event", "realtime": True,
                           "task_name": "zarkov.examples.EventsPerTypePerDay"})
    with ZarkovClient(zconfig["bson_uri"]) as client:
        for i in range(30):
            client.event("login", {"user": f"u{i}"})
    wait_for(lambda: positions.waiting(db, "per_type") == 0
             and db["zagg.events_per_day"].count_documents({}) > 0,
             timeout=60, what="the 30 events counted")
    out = run_zcmd(path, "status", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert text.startswith("zarkov: ok") and "problem" not in text, text
    # (A worker process may be recycling itself at this moment: 1 or 2.)
    assert re.search(rf"router      {re.escape(zconfig['zmr']['req_uri'])}: [12] worker "
                     r"process\(es\), \d+ job\(s\) running", text), text
    assert "events      server 0 (pid " in text and "NOT RUNNING" not in text, text
    # The stream its logger began (a fresh journal), from the registry: what a host
    # without event servers shows of the others.
    assert re.search(rf"stream      \w+ \(event\) on {re.escape(socket.gethostname())}, "
                     r"pid \d+: stored up to 30, last insert \d+ s ago", text), text
    assert "aggdef      per_type: last run" in text and "up to date" in text, text
    report = json.loads(run_zcmd(path, "status", "--json", timeout=60).stdout)
    (agg,) = report["aggdefs"]
    assert agg["lag"] == {"waiting": 0, "oldest_age": None, "late": False}
    assert sum(s["committed"] for s in report["event_servers"]) == 30
    assert [s["stored"] for s in report["streams"]] == [30]
    procs.kill(proc, signal.SIGTERM)
    down = run_zcmd(path, "status", timeout=60)
    assert down.returncode == 1, down.stdout
    assert down.stdout.startswith("zarkov: DOWN") and "does not answer" in down.stdout
    assert "NOT RUNNING" in down.stdout, down.stdout
