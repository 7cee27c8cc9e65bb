"""The web service as users run it: inside zcmd serve, and alone as zcmd web-server.

Events over HTTP (journaled before the 202, surviving a SIGKILL; refused whole with a
400 naming the culprit; 413 past 64 KiB), the beacon (session cookie, proxies), the
bind rules (exit 2 without a token beyond loopback), and /aggdefs + /jobs after a
real aggregation through the router.
"""
from __future__ import annotations

import json
import os
import signal

import pytest

from tests.aggtools import ENV, add_events, register
from tests.support import free_port, run_zcmd, wait_for, write_config
from tests.webtools import get, post_json, request, start_serve, web_base
from zarkov.eventlog import journal as J

TOKEN = "a-long-enough-token-for-tests"


@pytest.fixture
def served(procs, config_file, zconfig):
    """A running zcmd serve (real-time loop off) with the web service; yields its base URL."""
    path = config_file(realtime_interval=1)
    proc = start_serve(procs, path, zconfig, "serve", "--no-realtime", env=ENV)
    return web_base(zconfig), proc, path


def web_events(db) -> list[dict]:
    return list(db.event.find({"type": "web"}))


def test_posted_events_are_in_the_journal_before_the_202_and_survive_a_sigkill(
        served, zconfig, db, procs):
    base, proc, path = served
    events = [{"type": "signup", "context": {"user": f"u{i}"}, "extra": {"i": i},
               "timestamp": {"$datetime": 1311292800 + i}} for i in range(50)]
    r = post_json(base, events)
    assert r.status == 202 and r.json() == {"accepted": 50}
    procs.kill(proc, signal.SIGKILL)  # at once: the committer may not have run yet
    web_dir = os.path.join(zconfig["journal"], f"web-{zconfig['web_port']}")
    journaled = [d for p in J.list_files(web_dir) for d in J.read_records(p)[0]]
    stored = db.event.count_documents({"type": "signup"})
    assert len(journaled) + stored >= 50  # each one is in one place or the other
    start_serve(procs, path, zconfig, "serve2", "--no-realtime")
    wait_for(lambda: db.event.count_documents({"type": "signup"}) == 50, timeout=30,
             what="the replayed journal")
    docs = sorted(db.event.find({"type": "signup"}), key=lambda d: d["extra"]["i"])
    assert [d["context"]["user"] for d in docs] == [f"u{i}" for i in range(50)]
    assert docs[3]["timestamp"].timestamp() == pytest.approx(1311292803, abs=0.001)


def test_a_bad_event_refuses_the_request_whole_and_names_it(served, zconfig, db):
    base, _, _ = served
    r = post_json(base, [{"type": "ok"}, {"type": "ok", "colour": "red"}, {"context": {}}])
    assert r.status == 400
    assert r.json()["parameter"] == "events[1]" and "'colour'" in r.json()["error"]
    assert r.headers["access-control-allow-origin"] == "*"
    r = post_json(base, {"type": 5})
    assert r.status == 400 and r.json()["parameter"] == "body" and "'type'" in r.json()["error"]
    for body, why in ((b"{nope", "not JSON"), (b"", "empty"), (b"[]", "empty list"),
                      (b'"text"', "not an event object"), (b"[1]", "not an event object")):
        r = request(base, "POST", "/events", body)
        assert r.status == 400 and why in r.json()["error"], (body, r)
    r = request(base, "POST", "/events", b"x" * (64 * 1024 + 1))
    assert r.status == 413 and r.json()["parameter"] == "body"
    # Nothing of the refused requests was stored; each bad one is in the rejects file.
    r = post_json(base, {"type": "fine"})
    assert r.status == 202
    wait_for(lambda: db.event.count_documents({}) == 1, what="the good event")
    assert db.event.find_one()["type"] == "fine"
    with open(os.path.join(zconfig["journal"], "rejects.jsonl")) as f:
        rejects = [json.loads(line) for line in f]
    assert [r["source"] for r in rejects] == ["http"] * 8
    assert "'colour'" in rejects[0]["reason"] and "missing field 'type'" in rejects[1]["reason"]
    wait_for(lambda: get(base, "/events/rate").json()["totals"]["rejected"] == 8,
             what="rejects counted in the logger's stats")


def test_a_browser_sends_events_with_sendbeacon_as_text_plain(served, db):
    base, _, _ = served
    r = request(base, "OPTIONS", "/events", headers={"Origin": "https://shop.example",
                                                     "Access-Control-Request-Method": "POST"})
    assert r.status == 204 and r.headers["access-control-allow-origin"] == "*"
    r = request(base, "POST", "/events", b'{"type": "click", "extra": {"x": 1}}',
                {"Content-Type": "text/plain;charset=UTF-8", "Origin": "https://shop.example"})
    assert r.status == 202
    wait_for(lambda: db.event.count_documents({"type": "click"}) == 1, what="the click")


def test_the_beacon_answers_a_gif_sets_a_session_and_records_who_and_where(served, db):
    base, _, _ = served
    headers = {"User-Agent": "TestAgent/1.0", "Referer": "https://shop.example/cart",
               "X-Forwarded-For": "203.0.113.9"}
    r = request(base, "GET", "/beacon.gif?page=cart&ab=b", headers=headers)
    assert r.status == 200 and r.headers["content-type"] == "image/gif"
    assert r.body[:6] == b"GIF89a" and r.body[6:10] == b"\x01\x00\x01\x00"
    assert "no-store" in r.headers["cache-control"] and r.headers["pragma"] == "no-cache"
    (cookie,) = r.cookies
    sid = cookie.split(";")[0].split("=", 1)[1]
    assert len(sid) == 32 and "Max-Age=63072000" in cookie and "HttpOnly" in cookie
    again = request(base, "GET", "/beacon.gif",
                    headers={**headers, "Cookie": f"zarkov_session={sid}"})
    assert again.status == 200 and again.cookies == []  # the session is kept
    forged = request(base, "GET", "/beacon.gif", headers={"Cookie": "zarkov_session=x'; drop"})
    assert len(forged.cookies) == 1  # a malformed session is replaced
    wait_for(lambda: len(web_events(db)) == 3, what="three web events")
    first, second, _ = sorted(web_events(db), key=lambda d: d["_id"])
    assert first["context"] == {"session": sid, "user_agent": "TestAgent/1.0",
                                "remote_addr": "127.0.0.1",  # no trusted proxy configured
                                "referer": "https://shop.example/cart", "path": "/beacon.gif",
                                "query": "page=cart&ab=b"}
    assert second["context"]["session"] == sid and second["context"]["query"] == ""


def test_the_beacon_believes_x_forwarded_for_from_a_trusted_proxy(procs, config_file, zconfig, db):
    path = config_file(web_trusted_proxies=["127.0.0.1"])
    start_serve(procs, path, zconfig, "serve", "--no-realtime")
    base = web_base(zconfig)
    r = request(base, "GET", "/beacon.gif", headers={
        "X-Forwarded-For": "198.51.100.20, 127.0.0.1", "X-Forwarded-Proto": "https"})
    assert r.status == 200
    assert "Secure" in r.cookies[0] and "SameSite=None" in r.cookies[0]
    wait_for(lambda: len(web_events(db)) == 1, what="the web event")
    assert web_events(db)[0]["context"]["remote_addr"] == "198.51.100.20"


def test_beyond_loopback_without_a_token_serve_and_web_server_exit_2_naming_the_key(
        config_file):
    path = config_file(web_bind="0.0.0.0")
    for command in ("web-server", "serve"):
        out = run_zcmd(path, command, timeout=60)
        assert out.returncode == 2, (command, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "'web_token'" in lines[0] and path in lines[0], lines


def test_web_server_alone_with_a_token_on_every_address(procs, config_file, zconfig, db):
    path = config_file(web_bind="0.0.0.0", web_token=TOKEN)
    p = procs.zcmd("web", path, "web-server")
    base = web_base(zconfig)
    wait_for(lambda: get(base, "/health").status in (200, 503), what="zcmd web-server")
    db["zagg.x"].insert_one({"_id": "2024-01-01", "value": 3})
    assert get(base, "/q", c="x").status == 401
    r = request(base, "GET", "/q?c=x", headers={"Authorization": f"Bearer {TOKEN}",
                                                "Host": "stats.example.com"})
    assert r.status == 200 and r.json() == {"value": [[1704067200000, 3]]}
    assert post_json(base, [{"type": "a"}, {"type": "b"}]).status == 202  # events: no token
    procs.kill(p, signal.SIGTERM)
    assert p.returncode == 0, procs.log("web")
    assert db.event.count_documents({}) == 2  # committed before it exited


def test_web_server_on_a_taken_port_says_so(procs, config_file, zconfig):
    path = config_file()
    procs.zcmd("web", path, "web-server")
    base = web_base(zconfig)
    wait_for(lambda: get(base, "/health").status in (200, 503), what="zcmd web-server")
    out = run_zcmd(path, "web-server", timeout=60)
    assert out.returncode == 1 and f":{zconfig['web_port']}" in out.stderr, out.stderr


def test_aggdefs_and_jobs_show_a_finished_run_and_a_failed_one(served, db):
    base, _, path = served
    add_events(db, 200, seed=3)
    register(db)
    register(db, "broken_agg", "my.no_such_module.Task")
    out = run_zcmd(path, "aggregate", "my_agg_def", env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert run_zcmd(path, "aggregate", "broken_agg", env=ENV, timeout=60).returncode == 2
    rows = {a["name"]: a for a in get(base, "/aggdefs").json()["aggdefs"]}
    ok = rows["my_agg_def"]
    assert ok["last"]["docs"] == 200 and ok["last"]["seconds"] > 0 and ok["running"] is None
    assert ok["last_error"] is None and ok["task_name"] == "my.tasks.MyTask"
    assert "my.no_such_module" in rows["broken_agg"]["last_error"]["message"]
    jobs = get(base, "/jobs").json()
    assert jobs["router"]["ok"] and jobs["router"]["workers"] >= 1
    (job,) = [j for j in jobs["jobs"] if j.get("aggdef") == "my_agg_def"]
    assert job["state"] == "complete" and job["docs_read"] == 200
    assert job["chunks_done"] == job["chunks_total"] >= 1 and job["kind"] == "mapreduce"
    # An incremental run's small output comes back inline: the job says how much.
    assert job["write_path"] == "inline" and job["docs_written"] == 0
    assert job["docs_inline"] == db["zagg.my_agg"].count_documents({}) == 7


def test_the_event_rate_counts_what_is_stored(served, zconfig, db):
    base, _, _ = served
    from zarkov.client import ZarkovClient
    client = ZarkovClient(zconfig["bson_uri"])
    for i in range(300):
        client.event("tick", {"i": i})
    client.close()
    wait_for(lambda: db.event.count_documents({}) == 300, what="300 events stored")
    # The stats files are rewritten 10 times a second and sampled twice: poll.
    report = wait_for(lambda: (r := get(base, "/events/rate", minutes=1, step=5).json())
                      ["totals"]["committed"] == 300 and r, what="the stats to say 300")
    assert sum(rate * 5 for _, rate in report["series"]) == pytest.approx(300)
    assert report["now"] > 0 and len(report["series"]) == 12


def test_the_event_rate_counts_an_event_logger_on_another_host(procs, zconfig, tmp_path, db):
    # The logger has a journal of its own, as it would on another host: the web
    # service reads none of its stats files, only the registry of streams.
    from zarkov.client import ZarkovClient
    elsewhere = dict(zconfig, journal=str(tmp_path / "logger-host" / "journal"))
    procs.zcmd("eventlog", write_config(str(tmp_path / "logger.yaml"), elsewhere), "eventlog")
    procs.zcmd("web", write_config(str(tmp_path / "web.yaml"), zconfig), "web-server")
    base = web_base(zconfig)
    wait_for(lambda: get(base, "/health").status == 200, what="zcmd web-server")
    client = ZarkovClient(zconfig["bson_uri"])
    for i in range(300):
        client.event("tick", {"i": i})
    client.close()
    wait_for(lambda: db.event.count_documents({}) == 300, what="300 events stored")

    def counted() -> dict | None:
        r = get(base, "/events/rate", minutes=1, step=5).json()
        return r if round(sum(rate * 5 for _, rate in r["series"])) == 300 else None
    report = wait_for(counted, what="the event rate to count the 300 events")
    assert report["now"] > 0
    assert report["totals"]["committed"] == 0  # no stats file of it here: nothing twice


def journal_one_then_die(procs, path: str, zconfig: dict):
    """A ``zcmd web-server`` whose committer dies on the one event posted to it (it
    is journaled: 202); returns the exited process."""
    from zarkov.faults import MARK
    p = procs.zcmd("web", path, "web-server", env={"ZARKOV_FAULTS": "commit.insert:die"})
    base = web_base(zconfig)
    wait_for(lambda: get(base, "/health").status in (200, 503), what="zcmd web-server")
    assert post_json(base, [{"type": "marked", "extra": MARK.decode()}]).status == 202
    wait_for(lambda: p.poll() is not None, timeout=60, what="web-server to exit")
    return p


def test_web_server_exits_70_when_its_committer_dies(procs, config_file, zconfig, db):
    from zarkov.errors import EXIT_LOOP_DIED
    path = config_file()
    p = journal_one_then_die(procs, path, zconfig)
    assert p.returncode == EXIT_LOOP_DIED, procs.log("web")
    assert "died" in procs.log("web")
    # Accepted means journaled: the next web-server on the port stores it.
    procs.zcmd("web2", path, "web-server")
    wait_for(lambda: db.event.count_documents({"type": "marked"}) == 1, timeout=30,
             what="the journaled event stored")


def test_a_web_service_on_a_new_port_stores_what_the_former_port_journaled(
        procs, config_file, zconfig, db):
    journal_one_then_die(procs, config_file(), zconfig)
    assert db.event.count_documents({"type": "marked"}) == 0  # journaled only
    # The operator moves the web service to another port.
    zconfig["web_port"] = free_port()
    procs.zcmd("web2", config_file(), "web-server")
    wait_for(lambda: db.event.count_documents({"type": "marked"}) == 1, timeout=30,
             what="the former port's journal replayed")
    assert "replaying the journal of web-" in procs.log("web2")
