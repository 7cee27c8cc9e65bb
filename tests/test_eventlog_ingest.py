"""The event logger through real processes: what is stored, what is rejected, the tools."""
from __future__ import annotations

import base64
import datetime as dt
import json
import os
import signal
import subprocess
import sys

import bson

from tests.eventlog_util import load, push, seqs, start_logger, stats
from tests.support import ROOT, proc_env, wait_for
from zarkov import streams


def test_bson_json_and_noval_events_are_stored_with_their_fields(procs, config_file, db):
    path = config_file()
    cfg = load(path)
    p = start_logger(procs, path)
    when = dt.datetime(2011, 11, 1, 12, 30, 5, 123000)
    before = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)
    push(cfg["bson_bind_address"], [
        {"type": "login", "context": {"user": "bob", "is_project_member": True},
         "extra": {"seq": 1, "n": [1, 2]}, "timestamp": when},
        {"type": "download", "extra": {"seq": 2}},
        {"$command": "event_noval", "anything": {"goes": 1}, "type": 7, "extra": {"seq": 3}},
    ])
    push(cfg["json_bind_address"], [json.dumps(
        {"type": "create", "context": {"project": "p1"}, "extra": {"seq": 4, "at":
         {"$datetime": 1320150605.5}}, "timestamp": {"$datetime": 1320150605}}).encode()])
    wait_for(lambda: db.event.count_documents({}) == 4, what="4 events stored")

    docs = {d["extra"]["seq"]: d for d in db.event.find()}
    assert docs[1]["type"] == "login" and docs[1]["timestamp"] == when
    assert docs[1]["context"] == {"user": "bob", "is_project_member": True}
    assert docs[1]["extra"] == {"seq": 1, "n": [1, 2]}
    # timestamp filled with the receive time, context with {}; the _id given by the logger
    assert before <= docs[2]["timestamp"] <= dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    assert docs[2]["context"] == {} and isinstance(docs[2]["_id"], bson.ObjectId)
    # event_noval: as sent, minus $command, plus its position (_id and _seq)
    assert {k: v for k, v in docs[3].items() if k not in ("_id", "_seq")} == \
        {"anything": {"goes": 1}, "type": 7, "extra": {"seq": 3}}
    # Every event has a position in the logger's one stream: numbers 1 to 4, the
    # stream's bound published once they were stored.
    (stream,) = {d["_id"].binary[:8] for d in docs.values()}
    assert sorted(d["_seq"] for d in docs.values()) == [1, 2, 3, 4]
    assert all(d["_id"].binary[8:] == d["_seq"].to_bytes(4, "big") for d in docs.values())
    wait_for(lambda: streams.bounds(db, "event") == {stream.hex(): 4}, what="bound 4")
    assert docs[4]["timestamp"] == dt.datetime(2011, 11, 1, 12, 30, 5)
    assert docs[4]["extra"]["at"] == dt.datetime(2011, 11, 1, 12, 30, 5, 500000)
    assert docs[4]["context"] == {"project": "p1"}

    procs.kill(p, signal.SIGTERM)
    assert p.returncode == 0
    assert "stopped: accepted 4, rejected 0, committed 4" in procs.log("eventlog")


def test_bad_messages_are_rejected_counted_and_set_aside(procs, config_file, db):
    path = config_file()
    cfg = load(path)
    start_logger(procs, path)
    good = [{"type": "ok", "extra": {"seq": i}} for i in range(5)]
    push(cfg["bson_bind_address"], [
        good[0],
        b"\x05\x00\x00\x00garbage",                                # not BSON
        {"type": 5, "extra": {"seq": 100}},                       # type not a string
        good[1],
        {"type": "x", "context": "not a document"},               # context not a document
        {"type": "x", "timestamp": "yesterday"},                  # timestamp not a datetime
        {"extra": {"seq": 101}},                                  # no type
        {"type": "x", "colour": "red"},                           # unknown field
        {"$command": "drop_everything"},                          # unknown $command
        bson.encode({"type": "big", "extra": "x" * (17 << 20)}),  # over 16 MB
        good[2],
    ])
    push(cfg["json_bind_address"], [b"{not json", b"[1, 2]", b'{"type": "x", "n": NaN}',
                                    b'{"type": "x", "timestamp": {"$datetime": "soon"}}',
                                    json.dumps(good[3]).encode(), json.dumps(good[4]).encode()])
    journal = cfg["journal"]
    wait_for(lambda: stats(journal).get("rejected") == 12 and stats(journal)["accepted"] == 5,
             what="12 rejects, 5 accepted")
    wait_for(lambda: db.event.count_documents({}) == 5, what="the 5 good events stored")
    assert seqs(db.event) == [0, 1, 2, 3, 4]

    with open(os.path.join(journal, "rejects.jsonl")) as f:
        rejects = [json.loads(line) for line in f]
    assert len(rejects) == 12
    reasons = " | ".join(r["reason"] for r in rejects)
    for words in ("not a BSON document", "'type' must be a string",
                  "'context' must be a document", "'timestamp' must be a datetime",
                  "missing field 'type'", "unknown field 'colour'",
                  "unknown $command 'drop_everything'", "over the 16 MB limit", "not JSON",
                  "a JSON list is not an event object", "$datetime"):
        assert words in reasons
    assert base64.b64decode(rejects[0]["data_b64"]) == b"\x05\x00\x00\x00garbage"
    big = [r for r in rejects if "16 MB" in r["reason"]][0]
    assert big["truncated"] and big["size"] > 17 << 20
    assert "rejected bson message" in procs.log("eventlog")
    assert "b'{not json'" in procs.log("eventlog")


def test_zsend_and_shared_key(procs, config_file, db, tmp_path):
    path = config_file(shared_key="s3cret")
    cfg = load(path)
    start_logger(procs, path)
    keyfile = tmp_path / "key"
    keyfile.write_text("s3cret\n")
    lines = "\n".join([
        json.dumps({"type": "a", "extra": {"seq": 0}, "timestamp": {"$datetime": 1300000000}}),
        "this is not json",
        "",
        json.dumps({"type": "b", "context": {"user": "ann"}, "extra": {"seq": 1}}),
    ]) + "\n"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "zsend"),
                          cfg["bson_uri"], f"@{keyfile}"],
                         input=lines, capture_output=True, text=True, env=proc_env(), timeout=60)
    assert out.returncode == 1, out.stderr
    assert "line 2: skipped: not JSON" in out.stderr
    # without the key, or with a wrong one: rejected
    push(cfg["bson_bind_address"], [{"type": "nokey", "extra": {"seq": 10}}])
    push(cfg["bson_bind_address"], [{"type": "badkey", "extra": {"seq": 11}}], key=b"guess")
    wait_for(lambda: db.event.count_documents({}) == 2 and stats(cfg["journal"])["rejected"] == 2,
             what="2 stored, 2 rejected")
    docs = {d["extra"]["seq"]: d for d in db.event.find()}
    assert docs[0]["timestamp"] == dt.datetime(2011, 3, 13, 7, 6, 40)
    assert docs[1]["context"] == {"user": "ann"}
    assert "missing or wrong shared key" in procs.log("eventlog")


def test_client_events_and_noval(procs, config_file, db):
    from zarkov.client import ZarkovClient
    path = config_file()
    cfg = load(path)
    start_logger(procs, path)
    when = dt.datetime(2020, 1, 2, 3, 4, 5)
    with ZarkovClient(cfg["bson_uri"]) as client:
        client.event("download", {"user": "bob"}, extra={"seq": 0})
        client.event("login", {"user": "ann"}, extra={"seq": 1}, timestamp=when)
        client.event_noval({"kind": "raw", "extra": {"seq": 2}}, note="kw")
        # The original ZarkovClient's form (2011-2012): event_noval(type, context, extra=None).
        client.event_noval("legacy", {"user": "cy"}, {"seq": 3})
        client.event_noval(type="legacy_kw", context={"user": "di"}, extra={"seq": 4})
    assert client.sent == 5 and client.dropped == 0
    wait_for(lambda: db.event.count_documents({}) == 5, what="5 events stored")
    docs = {d["extra"]["seq"]: d for d in db.event.find()}
    assert docs[0]["type"] == "download" and docs[0]["context"] == {"user": "bob"}
    assert docs[1]["timestamp"] == when
    assert {k: v for k, v in docs[2].items() if k not in ("_id", "_seq")} == \
        {"kind": "raw", "extra": {"seq": 2}, "note": "kw"}
    for seq, kind, user in ((3, "legacy", "cy"), (4, "legacy_kw", "di")):
        assert {k: v for k, v in docs[seq].items() if k not in ("_id", "_seq")} == \
            {"type": kind, "context": {"user": user}, "extra": {"seq": seq}}


def test_several_event_servers_share_the_work(procs, config_file, db):
    path = config_file(num_event_servers=2)
    cfg = load(path)
    p = procs.zcmd("eventlog", path, "eventlog")
    wait_for(lambda: stats(cfg["journal"], 0).get("pid") and stats(cfg["journal"], 1).get("pid"),
             timeout=30, what="two event servers")
    n = 6000
    push(cfg["bson_bind_address"], [{"type": "t", "extra": {"seq": i}} for i in range(n)])
    push(cfg["json_bind_address"], [json.dumps({"type": "j", "extra": {"seq": n}}).encode()])
    wait_for(lambda: db.event.count_documents({}) == n + 1, timeout=60, what="every event stored")
    assert seqs(db.event) == list(range(n + 1))
    # The stats files are rewritten a few times a second: wait for the last write.
    both = wait_for(lambda: (b := [stats(cfg["journal"], i)["accepted"] for i in (0, 1)])
                    and sum(b) == n + 1 and b, what="both servers' stats")
    assert min(both) > 0, both
    procs.kill(p, signal.SIGTERM)
    assert p.returncode == 0, procs.log("eventlog")
    assert procs.log("eventlog").count("stopped: accepted") == 2


def test_a_stop_signal_to_the_whole_group_starts_no_event_server_again(procs, config_file):
    # Ctrl-C or systemd signal every process of the group: the event servers may see
    # it, stop and exit before their parent gets to its own handler.
    path = config_file(num_event_servers=2)
    cfg = load(path)
    p = procs.zcmd("eventlog", path, "eventlog")
    pids = wait_for(lambda: all(found := [stats(cfg["journal"], i).get("pid") for i in (0, 1)])
                    and found, timeout=30, what="two event servers")
    children = [pid for pid in pids if pid != p.pid]
    assert children, pids
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: procs.log("eventlog").count("exited with status 0") == len(children),
             what="the servers' exits seen by their parent")
    procs.kill(p, signal.SIGTERM)
    log = procs.log("eventlog")
    assert p.returncode == 0, log
    assert log.count("stopped: accepted") == 2, log
    assert "Traceback" not in log and "ContextTerminated" not in log, log
