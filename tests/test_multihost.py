"""Several hosts for real: network namespaces joined by veth pairs (tests/netns.py).

Three hosts: ``server`` runs ``zcmd serve`` (router and event logger, no local
workers) and a FerretDB of this module, ``workers`` runs ``zcmd zmr-worker``,
``app`` sends events, runs ``zcmd aggregate`` and map-reduce clients.  Every socket
uses CURVE; only the addresses of these namespaces (and the bridge's, from which
the tests look) are used.  Needs root; skipped with the reason where namespaces
cannot be made.
"""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pymongo
import pytest

from tests import netns
from tests.aggtools import ENV as TASKS_ENV
from tests.curvetools import client_section, make_keys, server_section
from tests.eventlog_util import stats
from tests.support import ROOT, ZCMD, Processes, free_port, proc_env, wait_for, write_config
from zarkov import wire

pytestmark = pytest.mark.slow

FERRETDB = os.path.join(ROOT, "var", "bin", "ferretdb")
TYPES = ("login", "download", "create", "view")


def _ferretdb(procs: Processes, network: netns.Network, host: str, data: str) -> str:
    """Start a FerretDB of this module on ``host``; its URI once it answers."""
    if not os.access(FERRETDB, os.X_OK):
        build = subprocess.run([os.path.join(ROOT, "scripts", "dev-db"), "build"],
                               capture_output=True, text=True, timeout=900)
        if build.returncode != 0:
            pytest.skip(f"multi-host tests need the bundled FerretDB: {build.stderr.strip()}")
    port, address = free_port(), network.hosts[host]
    os.makedirs(data)
    procs.start("ferretdb", network.argv(host, [FERRETDB, "-listen", f"{address}:{port}",
                                                "-data", data]))
    uri = f"mongodb://{address}:{port}/"

    def ping():
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=500)
        try:
            return client.admin.command("ping")
        finally:
            client.close()
    wait_for(ping, timeout=60, what=f"FerretDB on {address}:{port}")
    return uri


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """The three hosts, a FerretDB on the server host, a set of keys; all removed at the
    end (and what an interrupted earlier run left, at the start)."""
    why = netns.unavailable()
    if why:
        pytest.skip(why)
    netns.remove_leftovers()
    tmp = tmp_path_factory.mktemp("multihost")
    procs = Processes(str(tmp))
    network = None
    try:
        network = netns.Network()
        for host in ("server", "workers", "app"):
            network.add_host(host)
        uri = _ferretdb(procs, network, "server", str(tmp / "ferretdb"))
        mongo = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10000)
        yield SimpleNamespace(network=network, hosts=network.hosts, mongo_uri=uri,
                              mongo=mongo, keys=make_keys(str(tmp / "keys")))
        mongo.close()
    finally:
        procs.stop_all()
        if network is not None:
            network.destroy()


@pytest.fixture
def cluster(net, procs, tmp_path):
    """Configs for this test (its own database) and helpers to start processes on hosts."""
    db_name = "zt_mh_" + os.urandom(6).hex()
    srv = net.hosts["server"]
    bson_address = f"tcp://{srv}:{free_port()}"
    req = f"tcp://{srv}:{free_port()}"
    base = {"mongo_uri": net.mongo_uri, "mongo_database": db_name,
            "bson_bind_address": bson_address, "bson_uri": bson_address,
            "json_bind_address": f"tcp://{srv}:{free_port()}",
            "publish_bind_address": f"tcp://{srv}:{free_port()}",
            "journal": str(tmp_path / "journal"), "num_event_servers": 1,
            "zmr": {"req_uri": req, "req_bind": req, "worker_uri": f"tcp://{srv}",
                    "job_root": str(tmp_path / "zmr"), "local_workers": 0,
                    "processes_per_worker": 2, "reduce_count": 4, "map_chunk_size": 2000,
                    "max_chunk_timeout": 8}}

    def config(name: str, security: dict | None) -> str:
        data = dict(base, **({"security": security} if security is not None else {}))
        return write_config(str(tmp_path / f"{name}.yaml"), data)

    c = SimpleNamespace(db=net.mongo[db_name], base=base, uri=req, procs=procs,
                        server=config("server", server_section(net.keys)),
                        worker=config("worker", client_section(net.keys, "worker")),
                        app=config("app", client_section(net.keys, "app")),
                        intruder=config("intruder", client_section(net.keys, "intruder")),
                        nokey=config("nokey", None), config=config)

    def start(host: str, name: str, config_path: str, *args: str, env=None):
        return procs.start(name, net.network.argv(host, ZCMD + ["-y", config_path, *args]),
                           env=env)

    def run(host: str, argv: list[str], timeout: float = 300, env=None, input=None):
        return subprocess.run(net.network.argv(host, argv), capture_output=True, text=True,
                              timeout=timeout, env=proc_env(env), cwd=ROOT, input=input)

    def status(timeout: float = 2.0) -> dict:
        return wire.request(req, {"$command": "status"}, timeout, net.keys.app)

    c.start, c.run, c.status = start, run, status
    yield c
    procs.stop_all()
    net.mongo.drop_database(db_name)


def serve(c) -> subprocess.Popen:
    """``zcmd serve`` (router and event logger) on the server host, once it answers."""
    p = c.start("server", "serve", c.server, "serve", "--no-realtime")
    wait_for(lambda: p.poll() is None and c.status(), timeout=60,
             what=f"zcmd serve on the server host: {c.procs.log('serve')[-1000:]}")
    return p


def workers(c, host: str = "workers", name: str = "workers", n: int = 2) -> subprocess.Popen:
    """``zcmd zmr-worker -n n`` on ``host``, once the router hears all of it."""
    p = c.start(host, name, c.worker if host == "workers" else c.app, "zmr-worker", "-n", str(n))
    wait_for(lambda: len(pids := children(p)) == n and pids <= set(c.status()["worker_pids"]),
             timeout=60, what=f"{n} worker processes on {host} reporting to the router")
    return p


def children(p: subprocess.Popen) -> set[int]:
    """The worker processes of the pool ``p`` (its child processes)."""
    try:
        with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
            return {int(x) for x in f.read().split()}
    except FileNotFoundError:
        return set()


def zsend_lines(first: int, n: int) -> str:
    return "".join(json.dumps({"type": TYPES[i % len(TYPES)], "context": {"user": f"u{i % 5}"},
                               "extra": {"seq": i}}) + "\n" for i in range(first, first + n))


def zsend(c, *args: str, lines: str):
    return c.run("app", [sys.executable, os.path.join(ROOT, "scripts", "zsend"),
                         c.base["bson_uri"], *args], input=lines, timeout=120)


def key_args(net, name: str) -> list[str]:
    return ["--server-key", net.keys.server_public, "--client-key", net.keys.secret[name]]


# -- the four scenarios -------------------------------------------------------------------

def test_a_job_and_an_aggregation_with_every_worker_on_another_host(net, cluster):
    c = cluster
    serve(c)
    pool = workers(c)
    assert set(c.status()["worker_pids"]) == children(pool)  # all on the workers host
    n = 600
    out = zsend(c, *key_args(net, "app"), lines=zsend_lines(0, n))
    assert out.returncode == 0, out.stderr
    wait_for(lambda: c.db.event.count_documents({}) == n, timeout=60, what=f"{n} events stored")
    want = collections.Counter(TYPES[i % len(TYPES)] for i in range(n))

    c.db.agg_def.insert_one({"name": "per_type", "object": "event",
                             "task_name": "zarkov.examples.EventsPerTypePerDay"})
    out = c.run("app", ZCMD + ["-y", c.app, "aggregate", "per_type"])
    assert out.returncode == 0, out.stderr
    assert f"per_type: {n} documents" in out.stdout
    counted = collections.Counter()
    for row in c.db["zagg.events_per_day"].find():
        counted[row["_id"]["type"]] += row["value"]
    assert counted == want

    out = c.run("app", [sys.executable, "-m", "tests.fixtures.remote_client", c.app,
                        c.db.name])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["state"] == "complete"
    assert {d["_id"]: d["value"] for d in c.db["zagg.by_type"].find()} == dict(want)


def test_a_job_survives_its_worker_host_cut_off_and_counts_once(net, cluster):
    c = cluster
    serve(c)
    workers(c)
    c.db.event.insert_many([{"foo": "abcdefg"[i % 7], "type": "t"} for i in range(400)])
    c.db.agg_def.insert_one({"name": "slow", "object": "event",
                             "task_name": "my.slow.SlowTask"})
    agg = c.start("app", "aggregate", c.app, "aggregate", "slow", env=TASKS_ENV)
    job = wait_for(lambda: re.search(r"job (\S+) \(mapreduce\) started",
                                     c.procs.log("serve")), timeout=60,
                   what="the aggregation's job").group(1)

    def job_status() -> dict:
        return wire.request(c.uri, {"$command": "status", "job_id": job}, 2,
                            net.keys.app)["status"]
    wait_for(lambda: job_status().get("chunks_done", 0) >= 2, timeout=60,
             what="two map chunks done on the workers host")
    net.network.set_link("workers", False)
    try:
        # the third host takes over (after max_chunk_timeout at most, per chunk)
        workers(c, host="app", name="workers-on-app")
        assert agg.wait(timeout=240) == 0, c.procs.log("aggregate")[-2000:]
        final = job_status()
    finally:
        net.network.set_link("workers", True)
    assert final["state"] == "complete" and final["chunks_resent"] >= 1
    want = collections.Counter("abcdefg"[i % 7] for i in range(400))
    assert {d["_id"]: d["value"] for d in c.db["zagg.my_agg"].find()} == dict(want)
    assert c.db.event.count_documents({"aggregates": "slow"}) == 400
    # the cut-off workers come back with whatever they still held: nothing changes
    out = c.run("app", ZCMD + ["-y", c.app, "aggregate", "slow"], env=TASKS_ENV)
    assert out.returncode == 0 and "slow: 0 documents" in out.stdout, out.stderr
    assert {d["_id"]: d["value"] for d in c.db["zagg.my_agg"].find()} == dict(want)


def test_workers_and_clients_without_an_authorised_key_are_refused(net, cluster):
    c = cluster
    serve(c)
    pool = workers(c)
    c.db.event.insert_many([{"type": TYPES[i % 4]} for i in range(200)])
    c.start("app", "worker-nokey", c.nokey, "zmr-worker", "-n", "1")
    c.start("app", "worker-intruder", c.intruder, "zmr-worker", "-n", "1")
    remote = [sys.executable, "-m", "tests.fixtures.remote_client"]
    refused = [subprocess.Popen(net.network.argv("app", remote + [cfg, c.db.name]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=proc_env(), cwd=ROOT)
               for cfg in (c.nokey, c.intruder)]
    out = c.run("app", remote + [c.app, c.db.name])
    assert out.returncode == 0, out.stderr
    for p in refused:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 3 and "refused: no" in err, err
    assert {d["_id"]: d["value"] for d in c.db["zagg.by_type"].find()} == \
        {t: 50 for t in TYPES}
    st = c.status()
    assert set(st["worker_pids"]) == children(pool)  # the app host's workers never got in
    assert st["refused_by_socket"]["requests"] >= 4
    app = re.escape(net.hosts["app"])
    log = c.procs.log("serve")
    # a line a second for the app host, the other reasons summed up in it
    line = rf"refused {app} on the router's requests \(zmr\.req_bind\): [^\n]*"
    assert re.search(line + "no CURVE key", log), log[-3000:]
    assert re.search(line + r"key \S+ is not authorised", log), log[-3000:]


def test_events_from_another_host_need_an_authorised_key(net, cluster):
    c = cluster
    serve(c)
    out = zsend(c, "--linger", "3", lines=zsend_lines(0, 20))
    assert out.returncode == 3 and "CURVE required" in out.stderr, out.stderr
    out = zsend(c, *key_args(net, "intruder"), "--linger", "3", lines=zsend_lines(20, 20))
    assert out.returncode == 3 and "refused our key" in out.stderr, out.stderr
    out = zsend(c, *key_args(net, "app"), lines=zsend_lines(100, 50))
    assert out.returncode == 0, out.stderr
    wait_for(lambda: c.db.event.count_documents({}) >= 50, timeout=60, what="50 events stored")
    assert sorted(d["extra"]["seq"] for d in c.db.event.find()) == list(range(100, 150))
    wait_for(lambda: stats(c.base["journal"])["refused"] >= 2, timeout=10,
             what="2 refusals counted in the stats file")
    assert re.search(rf"refused {re.escape(net.hosts['app'])} on the BSON events",
                     c.procs.log("serve"))


# -- an open bind ---------------------------------------------------------------------------

def test_an_open_bind_needs_keys_or_allow_insecure(net, cluster):
    c = cluster
    out = c.run("server", ZCMD + ["-y", c.nokey, "zmr-router"], timeout=60)
    assert out.returncode == 2
    assert f"key 'zmr.req_bind': {c.uri} is beyond loopback" in out.stderr
    insecure = c.config("insecure", {"allow_insecure": True})
    c.start("server", "router", insecure, "zmr-router")
    # no keys needed now, from any host
    wait_for(lambda: wire.request(c.uri, {"$command": "echo"}, 1.0), timeout=60,
             what="the insecure router")
    assert "security.allow_insecure is true: " + c.uri in c.procs.log("router")


# -- the Dask engine across hosts ----------------------------------------------------------

# Seconds, so that a host cut off (no FIN: its connections just go silent) is noticed
# in seconds rather than Dask's defaults of minutes (docs/dask-engine.md, "Several hosts").
DASK_TIMEOUTS = {"DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "5s",
                 "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "5s",
                 "DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "12s"}  # ≥ 11 s: Dask asserts it


def test_dask_engine_across_hosts_over_tls_survives_a_worker_host_cut_off(net, cluster,
                                                                          tmp_path):
    """A Dask scheduler on the server host, one Dask worker on the workers host and one on
    the app host, TLS between all of them; ``zcmd aggregate`` on the app host runs the
    article's count (slowed down) there and the workers read FerretDB themselves.  The
    workers host is cut off mid-map: the scheduler gives its work to the other worker,
    and the count is exact, once."""
    from tests.dasktools import dask_installed, make_tls
    if not dask_installed():
        pytest.skip("dask is not installed")
    c = cluster
    ca, cert, key = make_tls(tmp_path, (net.hosts["server"], net.hosts["workers"],
                                        net.hosts["app"]))
    tls = ["--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key]
    port = free_port()
    address = f"tls://{net.hosts['server']}:{port}"
    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    c.procs.start("dask-scheduler", net.network.argv("server", [
        dask, "scheduler", "--host", net.hosts["server"], "--port", str(port),
        "--protocol", "tls", "--no-dashboard", "--no-show", *tls]), env=DASK_TIMEOUTS)
    for host in ("workers", "app"):
        c.procs.start(f"dask-worker-{host}", net.network.argv(host, [
            dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
            "--host", net.hosts[host], *tls]), env=DASK_TIMEOUTS)

    # The test runs outside the namespaces: it reads the scheduler's log.
    def registered() -> set[str]:
        return {host for host in ("workers", "app")
                if f"Register worker addr: tls://{net.hosts[host]}:" in
                c.procs.log("dask-scheduler")}
    wait_for(lambda: registered() == {"workers", "app"}, timeout=90,
             what="a Dask worker on each of the workers and app hosts")

    path = write_config(str(tmp_path / "dask.yaml"), {
        **c.base, "zmr": {**c.base["zmr"], "engine": "dask", "dask_scheduler": address},
        "security": {"dask_tls_ca": ca, "dask_tls_cert": cert, "dask_tls_key": key}})
    c.db.event.insert_many([{"foo": "abcdefg"[i % 7], "type": "t"} for i in range(400)])
    c.db.agg_def.insert_one({"name": "slow", "object": "event",
                             "task_name": "my.slow.SlowTask"})
    agg = c.start("app", "aggregate", path, "aggregate", "slow", env={**TASKS_ENV,
                                                                      **DASK_TIMEOUTS})
    # The job as the web service sees it: its line in dask_job.
    wait_for(lambda: c.db.dask_job.find_one({"state": "map", "chunks_done": {"$gte": 2}}),
             timeout=120, what=f"two map chunks done: {c.procs.log('aggregate')[-1000:]}")
    net.network.set_link("workers", False)
    try:
        assert agg.wait(timeout=240) == 0, c.procs.log("aggregate")[-2000:]
    finally:
        net.network.set_link("workers", True)
    want = collections.Counter("abcdefg"[i % 7] for i in range(400))
    assert {d["_id"]: d["value"] for d in c.db["zagg.my_agg"].find()} == dict(want)
    assert c.db.event.count_documents({"aggregates": "slow"}) == 400
    line = c.db.dask_job.find_one({"state": "complete"})
    assert line is not None and line["engine"] == "dask" and line["docs_read"] == 400
    out = c.run("app", ZCMD + ["-y", path, "aggregate", "slow"], env={**TASKS_ENV,
                                                                     **DASK_TIMEOUTS})
    assert out.returncode == 0 and "slow: 0 documents" in out.stdout, out.stderr
    assert {d["_id"]: d["value"] for d in c.db["zagg.my_agg"].find()} == dict(want)
