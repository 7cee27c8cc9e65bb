"""Security on one host: loopback by default, no open bind without keys, CURVE with ZAP
on every socket (unauthorised peers refused, counted and logged), revocation without a
restart, the keys that clients take, and ``zcmd keys``.  (Several hosts: test_multihost.)
"""
from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest
import zmq

from tests.curvetools import client_section, make_keys, server_section
from tests.eventlog_util import load, push, start_logger, stats
from tests.fixtures import zmr_functions as F
from tests.support import (
    ROOT,
    Cluster,
    free_port,
    proc_env,
    run_zcmd,
    subscriber,
    wait_for,
    write_config,
)
from zarkov import config as C
from zarkov import keyfiles as K
from zarkov import security, wire
from zarkov.client import ZarkovClient
from zarkov.security import ClientKeys
from zarkov.zmr import client


@pytest.fixture
def curve(tmp_path):
    """A fresh set of keys (see curvetools.make_keys)."""
    return make_keys(str(tmp_path / "keys"))


def no_answer(uri: str, keys, timeout: float = 1.5) -> bool:
    """True when a request with ``keys`` gets no answer (the router refused us)."""
    try:
        wire.request(uri, {"$command": "echo"}, timeout, keys)
    except wire.RouterTimeout:
        return True
    return False


# -- loopback by default, and no open bind without keys ---------------------------------

def test_every_bind_address_defaults_to_loopback():
    cfg = C.from_dict({})
    for key in security.BIND_KEYS:
        assert security.is_loopback(security.bind_address(cfg, key)), key
    security.check_binds(cfg, security.BIND_KEYS)  # no error, nothing to warn about


@pytest.mark.parametrize("address, local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.3.4.5", True), ("tcp://localhost:1", True),
    ("tcp://[::1]:5555", True), ("tcp://lo:5555", True), ("ipc:///tmp/x", True),
    ("inproc://x", True), ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False),
    ("tcp://10.1.2.3:5555", False), ("tcp://[::]:5555", False), ("tcp://eth0:1", False),
    ("tcp://example.org:1", False), ("udp://127.0.0.1:1", False), ("127.0.0.1:1", False),
])
def test_what_counts_as_loopback(address, local):
    assert security.is_loopback(address) is local


def test_check_binds_refuses_warns_or_allows(curve, caplog):
    open_bind = {"zmr": {"req_bind": "tcp://0.0.0.0:5555"}}
    with pytest.raises(C.ConfigError) as e:
        security.check_binds(C.from_dict(open_bind, "z.yaml"), ["zmr.req_bind"])
    assert str(e.value).startswith("z.yaml: key 'zmr.req_bind': tcp://0.0.0.0:5555 ")
    assert "zcmd keys init" in str(e.value) and "security.allow_insecure: true" in str(e.value)
    with caplog.at_level(logging.WARNING, "zarkov.security"):
        security.check_binds(C.from_dict({**open_bind, "security": {"allow_insecure": True}}),
                             ["zmr.req_bind"])
    assert "allow_insecure is true: tcp://0.0.0.0:5555 (zmr.req_bind) accepts anyone" \
        in caplog.text
    security.check_binds(C.from_dict({**open_bind, "security": server_section(curve)}),
                         ["zmr.req_bind"])


@pytest.mark.parametrize("command, key, value", [
    ("zmr-router", "zmr.req_bind", "tcp://0.0.0.0:{port}"),
    ("zmr-router", "zmr.worker_uri", "tcp://0.0.0.0"),
    ("eventlog", "bson_bind_address", "tcp://0.0.0.0:{port}"),
    ("eventlog", "json_bind_address", "tcp://*:{port}"),
    ("serve", "publish_bind_address", "tcp://0.0.0.0:{port}"),
])
def test_zcmd_will_not_bind_beyond_loopback_without_keys(config_file, command, key, value):
    value = value.format(port=free_port())
    section, _, name = key.rpartition(".")
    path = config_file(**({section: {name: value}} if section else {name: value}))
    out = run_zcmd(path, command, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"zcmd: {path}: key '{key}': {value} is beyond loopback")
    assert "zcmd keys init" in lines[0] and "security.allow_insecure: true" in lines[0]


# -- the security section of the config -------------------------------------------------

@pytest.mark.parametrize("change, culprit, why", [
    ({"server_key": "nope.key_secret"}, "security.server_key", "no such file"),
    ({"server_key": "{server_public}"}, "security.server_key", "holds only a public key"),
    ({"server_key": "{garbage}"}, "security.server_key", "not a CURVE key file"),
    ({"authorized_keys": None}, "security.authorized_keys", "needed with security.server_key"),
    ({"authorized_keys": "{garbage}"}, "security.authorized_keys", "no such directory"),
    ({"server_key": None, "authorized_keys": None, "client_key": "{app}"},
     "security.server_public_key", "needed with security.client_key"),
    ({"server_key": None, "authorized_keys": None, "server_public_key": "{server_public}",
      "client_key": "{server_public}"}, "security.client_key", "holds only a public key"),
    ({"allow_insecure": "yes"}, "security.allow_insecure", "expected true or false"),
    ({"server_keys": "x"}, "security.server_keys", "unknown key"),
])
def test_security_config_errors_name_the_key_and_the_file(curve, tmp_path, change, culprit, why):
    garbage = tmp_path / "garbage.key"
    garbage.write_text("public-key = \"not a key\"\n")
    names = {"server_public": curve.server_public, "garbage": str(garbage),
             "app": curve.secret["app"]}
    sec = {**server_section(curve), **{k: v.format(**names) if isinstance(v, str) else v
                                       for k, v in change.items()}}
    path = write_config(str(tmp_path / "z.yaml"), {"security": sec})
    with pytest.raises(C.ConfigError) as e:
        C.load(path)
    assert str(e.value).startswith(f"{path}: ") and culprit in str(e.value), str(e.value)
    assert why in str(e.value)
    out = run_zcmd(path, "check-config")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1


def test_relative_key_paths_are_relative_to_the_config_file(curve, tmp_path):
    path = write_config(os.path.join(curve.dir, "z.yaml"),
                        {"security": {"server_key": "server.key_secret",
                                      "authorized_keys": "authorized"}})
    cfg = C.load(path)
    assert cfg.security.server_key == curve.server_secret
    assert cfg.security.authorized_keys == curve.authorized
    # a host that serves uses its server key pair as its client keys too
    assert security.client_keys(cfg) == ClientKeys.load(curve.server_public,
                                                        curve.server_secret)


# -- the router: CURVE, ZAP, counts and logs ---------------------------------------------

@pytest.fixture
def curve_router(procs, zconfig, curve, tmp_path, db):
    """A router with CURVE, 2 authorised worker processes started as a client host would
    ('worker' key), and an intruder's pool ('intruder' key).  Yields the Cluster."""
    server = write_config(str(tmp_path / "server.yaml"),
                          {**zconfig, "security": server_section(curve)})
    worker = write_config(str(tmp_path / "worker.yaml"),
                          {**zconfig, "security": client_section(curve, "worker")})
    intruder = write_config(str(tmp_path / "intruder.yaml"),
                            {**zconfig, "security": client_section(curve, "intruder")})
    cluster = Cluster(procs, server, keys=curve.app)
    cluster.start_router()
    cluster.path = worker
    cluster.start_workers()
    procs.zcmd("intruders", intruder, "zmr-worker")
    db.event.insert_many([{"s": f"s{i % 7}"} for i in range(700)])
    return cluster


def test_the_router_serves_authorised_keys_and_refuses_the_others(curve_router, curve,
                                                                  zconfig, db, procs):
    uri = zconfig["zmr"]["req_uri"]
    no_key = wire.req_socket(uri)
    intruder = wire.req_socket(uri, keys=curve.intruder)
    for sock in (no_key, intruder):
        with pytest.raises(wire.RouterTimeout):
            client.submit(sock, client.mapreduce_request(
                F.map_by_s, F.reduce_sum, database=db.name, output_name="zagg.bad"), 2.0)
        sock.close(0)
    cfg = C.from_dict({**zconfig, "security": client_section(curve, "app")})
    sock = client.connect(cfg)
    status = client.run(sock, client.mapreduce_request(
        F.map_by_s, F.reduce_sum, database=db.name, output_name="zagg.by_s"), timeout=120)
    assert status["state"] == "complete"
    assert {d["_id"]: d["value"] for d in db["zagg.by_s"].find()} == \
        {f"s{i}": 100 for i in range(7)}
    assert "zagg.bad" not in db.list_collection_names()
    st = client.call(sock, {"$command": "status"})
    sock.close(0)
    # the intruder's pool runs, but only the 2 authorised processes count as workers
    assert st["workers"] == 2 and st["curve"] is True
    assert st["refused_by_socket"]["requests"] >= 2 and st["refused"] >= 2
    log = procs.log("router")
    line = r"refused 127\.0\.0\.1 on the router's requests \(zmr\.req_bind\): [^\n]*"
    # The key-less peer: its handshake fails (or it hangs up first) before the monitor
    # may have learnt its address from the connection, which is gone by then.
    keyless = (r"refused (127\.0\.0\.1|an unknown address) on the router's requests "
               r"\(zmr\.req_bind\): [^\n]*no CURVE key")
    assert re.search(keyless, log), log[-2000:]
    assert re.search(line + r"key \S+ is not authorised", log), log[-2000:]


def test_refusals_are_logged_at_most_once_a_second_per_peer(curve_router, curve, zconfig,
                                                            procs):
    uri = zconfig["zmr"]["req_uri"]

    def lines() -> int:
        return procs.log("router").count("refused 127.0.0.1")
    before, logged = curve_router.status()["refused"], lines()
    started = time.monotonic()
    socks = [wire.req_socket(uri, keys=curve.intruder) for _ in range(40)]
    for s in socks:
        s.send(wire.encode({"$command": "echo"}))
    wait_for(lambda: curve_router.status()["refused"] >= before + 40, timeout=30,
             what="40 more refusals counted")
    new_lines = lines() - logged
    seconds = time.monotonic() - started
    for s in socks:
        s.close(0)
    # these sockets and the intruders' pool, all from 127.0.0.1: at most a line a
    # second per socket (requests, tasks, sink), however many refusals
    assert 1 <= new_lines <= 3 * (seconds + 1), (new_lines, seconds)


def test_a_revoked_key_is_refused_without_a_restart(curve_router, curve, zconfig, tmp_path,
                                                    procs):
    uri = zconfig["zmr"]["req_uri"]
    sock = wire.req_socket(uri, keys=curve.app)
    assert wire.call(sock, {"$command": "echo", "n": 1}, 5)["message"]["n"] == 1
    cfg = write_config(str(tmp_path / "keys.yaml"), {"security": server_section(curve)})
    out = run_zcmd(cfg, "keys", "revoke", "app")
    assert out.returncode == 0 and "revoked" in out.stdout, out.stderr
    wait_for(lambda: no_answer(uri, curve.app), timeout=20, what="the revoked key refused")
    # on the connection made before the revocation, requests are dropped too
    with pytest.raises(wire.RouterTimeout):
        wire.call(sock, {"$command": "echo"}, 3)
    sock.close(0)
    wait_for(lambda: "was revoked" in procs.log("router"), timeout=10,
             what="the dropped request logged")
    # the other keys still work, workers included
    assert wire.request(uri, {"$command": "echo"}, 5, curve.worker)
    curve_router.keys = curve.worker
    wait_for(lambda: curve_router.status()["workers"] == 2, timeout=20,
             what="the authorised workers back")
    # and authorising it again lets it in again
    assert run_zcmd(cfg, "keys", "authorize", curve.secret["app"]).returncode == 0
    wait_for(lambda: not no_answer(uri, curve.app), timeout=20, what="the key admitted again")


# -- the event logger ------------------------------------------------------------------------

@pytest.mark.parametrize("servers", [1, 2])
def test_events_without_an_authorised_key_are_dropped_and_counted(
        procs, config_file, curve, db, servers):
    path = config_file(num_event_servers=servers, security=server_section(curve))
    cfg = load(path)
    if servers == 1:
        p = start_logger(procs, path)
    else:
        p = procs.zcmd("eventlog", path, "eventlog")
        wait_for(lambda: all(stats(cfg["journal"], i).get("pid") for i in range(servers)),
                 timeout=30, what="two event servers")
    push(cfg["bson_bind_address"], [{"type": "x", "extra": {"seq": i}} for i in range(50)],
         linger=1)
    push(cfg["bson_bind_address"], [{"type": "x", "extra": {"seq": i}} for i in range(50, 99)],
         keys=curve.intruder, linger=1)
    refusals = os.path.join(cfg["journal"], "stats-0.json" if servers == 1 else
                            "stats-proxy.json")
    wait_for(lambda: json.load(open(refusals))["refused"] >= 2, timeout=30,
             what="2 refusals in the stats file")
    with ZarkovClient(cfg["bson_uri"], server_key=curve.server_public,
                      client_key=curve.secret["app"]) as c:
        for i in range(100, 140):
            c.event("ok", {"u": 1}, extra={"seq": i})
    wait_for(lambda: db.event.count_documents({}) >= 40, timeout=60, what="40 events stored")
    assert sorted(d["extra"]["seq"] for d in db.event.find()) == list(range(100, 140))
    assert re.search(r"refused 127\.0\.0\.1 on the BSON events \(bson_bind_address\)",
                     procs.log("eventlog"))
    if servers == 2:
        # the proxy reaches its children over ipc:// in a private directory
        child = stats(cfg["journal"], 0)["pid"]
        with open(f"/proc/{child}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        backend = argv[argv.index(b"--bson") + 1].decode()
        assert backend.startswith("ipc://")
        assert stat.S_IMODE(os.stat(os.path.dirname(backend[6:])).st_mode) == 0o700
    procs.kill(p, signal.SIGTERM)


def test_an_event_sender_whose_key_is_revoked_is_cut_off(procs, config_file, curve, db,
                                                         tmp_path):
    path = config_file(security=server_section(curve))
    cfg = load(path)
    start_logger(procs, path)
    app = ZarkovClient(cfg["bson_uri"], keys=curve.app, linger=0)
    for i in range(10):
        app.event("a", {}, extra={"seq": i})
    wait_for(lambda: db.event.count_documents({}) == 10, what="the first 10 events")
    K.revoke(curve.authorized, "app")
    wait_for(lambda: stats(cfg["journal"]).get("refused", 0) >= 1, timeout=30,
             what="the revoked sender refused when it reconnects")
    for i in range(10, 20):
        app.event("a", {}, extra={"seq": i})
    push(cfg["bson_bind_address"], [{"type": "w", "extra": {"seq": 99}}], keys=curve.worker)
    wait_for(lambda: db.event.count_documents({"extra.seq": 99}) == 1,
             what="an authorised sender's event")
    app.close()
    assert sorted(d["extra"]["seq"] for d in db.event.find()) == [*range(10), 99]


def test_zsend_takes_the_keys(procs, config_file, curve, db):
    path = config_file(security=server_section(curve))
    cfg = load(path)
    start_logger(procs, path)
    lines = "".join(json.dumps({"type": "z", "extra": {"seq": i}}) + "\n" for i in range(5))
    zsend = [sys.executable, os.path.join(ROOT, "scripts", "zsend"), cfg["bson_uri"]]
    out = subprocess.run(zsend + ["--server-key", curve.server_public, "--client-key",
                                  curve.secret["app"]], input=lines, capture_output=True,
                         text=True, env=proc_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: db.event.count_documents({}) == 5, what="5 events from zsend")
    out = subprocess.run(zsend + ["--linger", "2"], input=lines, capture_output=True,
                         text=True, env=proc_env(), timeout=60)
    # (whether ZeroMQ saw the server's greeting before it hung up is a matter of timing)
    assert out.returncode == 3 and "CURVE required" in out.stderr, out.stderr
    assert "events not sent (no --server-key/--client-key given)" in out.stderr
    out = subprocess.run(zsend + ["--server-key", curve.server_public, "--client-key",
                                  curve.secret["intruder"], "--linger", "2"], input=lines,
                         capture_output=True, text=True, env=proc_env(), timeout=60)
    assert out.returncode == 3 and "refused our key (not authorised)" in out.stderr
    out = subprocess.run(zsend + ["--server-key", curve.server_public], input=lines,
                         capture_output=True, text=True, env=proc_env(), timeout=60)
    assert out.returncode == 2 and "go together" in out.stderr
    assert db.event.count_documents({}) == 5


# -- zcmd serve with CURVE, every part ---------------------------------------------------------

def test_serve_with_curve_events_aggregates_and_announcements(procs, config_file, zconfig,
                                                               curve, db, tmp_path):
    path = config_file(realtime_interval=1, security=server_section(curve))
    proc = procs.zcmd("serve", path, "serve")
    uri = zconfig["zmr"]["req_uri"]
    wait_for(lambda: wire.request(uri, {"$command": "echo"}, 1.0, curve.app), timeout=60,
             what="the router of zcmd serve")
    subs = {}
    subs["app"] = subscriber(zconfig["publish_bind_address"], curve.app)
    nokey = subs["nokey"] = zmq.Context.instance().socket(zmq.SUB)  # its handshake fails
    nokey.setsockopt(zmq.LINGER, 0)
    nokey.setsockopt(zmq.SUBSCRIBE, b"")
    nokey.connect(zconfig["publish_bind_address"])
    db.agg_def.insert_one({"name": "per_type", "object": "event", "realtime": True,
                           "task_name": "zarkov.examples.EventsPerTypePerDay"})
    app_cfg = C.from_dict({**zconfig, "security": client_section(curve, "app")})
    sent = collections.Counter()
    with ZarkovClient.from_config(app_cfg) as c:
        for i in range(300):
            kind = ("login", "download", "create")[i % 3]
            c.event(kind, {"user": f"u{i % 7}"}, extra={"seq": i})
            sent[kind] += 1
    announced = 0

    def all_announced():
        nonlocal announced
        while subs["app"].poll(100):
            announced += wire.decode(subs["app"].recv())["docs"]
        return announced >= 300
    wait_for(all_announced, timeout=120, what="agg_complete for 300 events")
    counted = collections.Counter()
    for row in db["zagg.events_per_day"].find():
        counted[row["_id"]["type"]] += row["value"]
    assert counted == sent
    assert not subs["nokey"].poll(0)
    status = wire.request(uri, {"$command": "status"}, 5, curve.app)
    assert status["refused_by_socket"]["publish"] >= 1
    for s in subs.values():
        s.close(0)
    procs.kill(proc, signal.SIGTERM)
    assert proc.returncode == 0, procs.log("serve")[-2000:]


# -- zcmd keys ---------------------------------------------------------------------------------

def test_zcmd_keys_makes_authorises_lists_and_revokes(tmp_path):
    d = str(tmp_path / "k")
    out = run_zcmd(None, "keys", "init", d)
    assert out.returncode == 0, out.stderr
    assert f"server_key: {d}/server.key_secret" in out.stdout
    assert f"authorized_keys: {d}/authorized" in out.stdout
    assert stat.S_IMODE(os.stat(f"{d}/server.key_secret").st_mode) == 0o600
    assert run_zcmd(None, "keys", "init", d).returncode == 1  # never overwrites a key
    out = run_zcmd(None, "keys", "new", "web1", "--dir", str(tmp_path / "c"))
    assert out.returncode == 0, out.stderr
    secret = str(tmp_path / "c" / "web1.key_secret")
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    public, _ = K.read_key_file(secret, secret=True)
    # the config's authorised directory; a secret file gives only its public key away
    cfg = write_config(str(tmp_path / "z.yaml"), {"security": {
        "server_key": f"{d}/server.key_secret", "authorized_keys": f"{d}/authorized"}})
    out = run_zcmd(cfg, "keys", "authorize", secret)
    assert out.returncode == 0, out.stderr
    with open(f"{d}/authorized/web1.key") as f:
        text = f.read()
    assert public.decode() in text and "secret-key" not in text
    assert run_zcmd(cfg, "keys", "authorize", secret, "--name", "again").returncode == 1
    out = run_zcmd(cfg, "keys", "list")
    assert out.returncode == 0 and re.search(rf"^web1\s+{re.escape(public.decode())}$",
                                             out.stdout, re.M)
    assert run_zcmd(cfg, "keys", "revoke", "web1").returncode == 0
    assert run_zcmd(cfg, "keys", "list").stdout == ""
    out = run_zcmd(cfg, "keys", "revoke", "web1")
    assert out.returncode == 1 and "no such authorised key" in out.stderr
    out = run_zcmd(None, "keys", "list")
    assert out.returncode == 2 and "security.authorized_keys" in out.stderr
    out = run_zcmd(None, "keys", "new", "../evil")
    assert out.returncode == 1 and "bad key name" in out.stderr
