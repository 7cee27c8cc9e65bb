"""The map-reduce cluster end to end: a real router and a pool of 2 worker processes
on loopback, against the test database server; the same tests again on the Dask
engine (a Dask scheduler and 2 worker processes behind the gateway, which answers the
same protocol), except those of the router's own machinery."""
from __future__ import annotations

import collections
import datetime
import os
import signal
import time
import uuid

import bson
import pytest
import zmq

from tests.dasktools import DaskCluster, Gateway, dask_config, engines, worker_pids_of
from tests.fixtures import zmr_functions as F
from tests.support import (
    Processes,
    child_asleep,
    children,
    free_port,
    run_zcmd,
    wait_for,
    write_config,
)
from zarkov import wire
from zarkov.zmr import client

N_BIG = 50_000
N_SMALL = 2_000


def make_docs(n: int) -> list[dict]:
    """Deterministic documents with string, int, datetime and compound keys."""
    base = datetime.datetime(2024, 1, 1)
    return [{"s": f"s{(i * 7) % 37}", "i": (i * 13) % 101,
             "day": base + datetime.timedelta(days=(i * 11) % 30),
             "pad": "x" * (i % 50)} for i in range(n)]


class Cluster:
    def __init__(self, path, cfg, db, procs, pool_proc, job_root):
        self.path, self.cfg, self.db, self.procs = path, cfg, db, procs
        self.pool_proc, self.job_root = pool_proc, job_root
        self.uri = cfg["zmr"]["req_uri"]
        self.sock = wire.req_socket(self.uri)

    def request(self, funcs, *, xmr=False, input_name="event", **fields):
        fields.setdefault("database", self.db.name)
        return client.mapreduce_request(*funcs, xmr=xmr, input_names=[input_name], **fields)

    def run(self, request, timeout=180):
        return client.wait(self.sock, [client.submit(self.sock, request)], timeout,
                           raise_on_error=False).popitem()[1]

    def output(self, name):
        return {self.key(d["_id"]): d["value"] for d in self.db[name].find()}

    @staticmethod
    def key(k):
        return tuple(k.items()) if isinstance(k, dict) else k

    def worker_pids(self):
        return children(self.pool_proc.pid)

    def worker_in_map(self):
        """The pid of a worker process sleeping in map_slow, or None."""
        return child_asleep(self.pool_proc.pid)


@pytest.fixture(scope="module", params=engines())
def zmr(request, tmp_path_factory, mongo_uri, mongo_client):
    """The cluster of one engine: a router and a pool of 2 worker processes, or (dask)
    a Dask scheduler, 2 Dask worker processes and the gateway at the same req_uri."""
    engine = request.param
    tmp = tmp_path_factory.mktemp("zmr")
    name = "zt_" + uuid.uuid4().hex[:12]
    port = free_port()
    cfg = {"mongo_uri": mongo_uri, "mongo_database": name,
           "zmr": {"req_uri": f"tcp://127.0.0.1:{port}", "req_bind": f"tcp://127.0.0.1:{port}",
                   "worker_uri": "tcp://127.0.0.1", "job_root": str(tmp / "jobs"),
                   "reduce_count": 8, "processes_per_worker": 2, "map_chunk_size": 200000,
                   "max_chunk_timeout": 60}}
    procs = Processes(str(tmp))
    db = mongo_client[name]
    try:
        gateway = pool = None
        if engine == "dask":
            dask = DaskCluster(procs).start()
            cfg = dask_config(cfg, dask.address)
        path = write_config(str(tmp / "zarkov.yaml"), cfg)
        if engine == "dask":
            gateway = Gateway(procs, path)
        else:
            procs.zcmd("router", path, "zmr-router")
            pool = procs.zcmd("worker", path, "zmr-worker")
        docs = make_docs(N_BIG)
        for i in range(0, N_BIG, 5000):
            db.event.insert_many(docs[i:i + 5000], ordered=False)
        db.small.insert_many(make_docs(N_SMALL))
        uri = cfg["zmr"]["req_uri"]
        wait_for(lambda: wire.request(uri, {"$command": "status"}, 1.0).get("workers", 0) >= 2,
                 timeout=60, what="2 worker processes")
        c = Cluster(path, cfg, db, procs, pool, str(tmp / "jobs"))
        c.docs, c.engine, c.gateway = docs, engine, gateway
        yield c
        c.sock.close(0)
    finally:
        procs.stop_all()
        mongo_client.drop_database(name)


def router_only(zmr) -> None:
    """Skip a test of the router's own machinery on the Dask engine."""
    if zmr.engine != "router":
        pytest.skip("the router's own machinery (worker pool, ports, job files)")


def expected(docs, keyf):
    return dict(collections.Counter(keyf(d) for d in docs))


KEYS = {
    "string": (F.map_by_s, lambda d: d["s"]),
    "int": (F.map_by_i, lambda d: d["i"]),
    "datetime": (F.map_by_day, lambda d: d["day"]),
    "document": (F.map_by_doc, lambda d: (("s", d["s"]), ("r", d["i"] % 3))),
}


@pytest.fixture(scope="module")
def key_jobs(zmr):
    """One count-by-key job per key type over the big collection, all at once."""
    ids = {kind: client.submit(zmr.sock, zmr.request((m, F.reduce_sum), output_name=f"zagg.{kind}"))
           for kind, (m, _) in KEYS.items()}
    final = client.wait(zmr.sock, list(ids.values()), timeout=240, raise_on_error=False)
    return {kind: final[job_id] for kind, job_id in ids.items()}, ids


@pytest.mark.parametrize("kind", list(KEYS))
def test_count_by_key_equals_python_count(zmr, key_jobs, kind):
    statuses, ids = key_jobs
    st = statuses[kind]
    assert st["state"] == "complete", st.get("traceback")
    want = expected(zmr.docs, KEYS[kind][1])
    assert zmr.output(f"zagg.{kind}") == want
    assert st["docs_read"] == N_BIG
    assert st["chunks_done"] == st["chunks_total"] > 1
    assert st["partitions_done"] == st["partitions_total"] > 1
    assert st["docs_written"] == len(want)
    assert st["elapsed"] > 0
    assert not os.path.exists(os.path.join(zmr.job_root, ids[kind]))  # files removed


def test_jobs_ran_at_the_same_time(key_jobs):
    statuses, _ = key_jobs
    # Four jobs submitted together all finished; had they run one after another,
    # the last would have taken about the sum of the others.
    assert all(st["state"] == "complete" for st in statuses.values())


def test_xmapreduce_feeds_several_collections(zmr):
    st = zmr.run(zmr.request((F.xmap_two, F.xreduce_sum), xmr=True, output_prefix="zagg.x_"))
    assert st["state"] == "complete", st.get("traceback")
    assert zmr.output("zagg.x_by_s") == expected(zmr.docs, lambda d: d["s"])
    assert zmr.output("zagg.x_by_i") == expected(zmr.docs, lambda d: d["i"])


def test_worker_killed_mid_job_output_exact(zmr):
    router_only(zmr)
    job_id = client.submit(zmr.sock, zmr.request((F.map_slow, F.reduce_sum),
                                                 output_name="zagg.kill"))
    wait_for(lambda: client.status(zmr.sock, job_id)["chunks_done"] >= 2, timeout=120,
             what="two chunks done")
    # A process caught inside map_slow's sleep holds a chunk: its death must make the
    # router send that chunk again.  (One merely waiting for work, as both may when
    # the database reads slower than they map, holds nothing to resend.)
    victim = wait_for(lambda: zmr.worker_in_map(), timeout=60,
                      what="a worker process inside the map")
    os.kill(victim, signal.SIGKILL)
    st = client.wait(zmr.sock, [job_id], timeout=180)[job_id]
    assert st["state"] == "complete"
    assert st["chunks_resent"] >= 1
    assert zmr.output("zagg.kill") == expected(zmr.docs, lambda d: d["s"])
    # The pool replaced the killed process.
    wait_for(lambda: len(zmr.worker_pids()) == 2 and victim not in zmr.worker_pids(),
             timeout=30, what="the pool to replace the killed process")


def test_dask_worker_killed_mid_job_output_exact(zmr):
    """SIGKILL a Dask worker process while it maps: Dask computes what it held again
    elsewhere (its nanny starts it again), and the output is exact."""
    if zmr.engine != "dask":
        pytest.skip("the Dask engine's recovery")
    job_id = client.submit(zmr.sock, zmr.request((F.map_slow, F.reduce_sum),
                                                 output_name="zagg.dkill"))
    wait_for(lambda: client.status(zmr.sock, job_id)["chunks_done"] >= 2, timeout=120,
             what="two chunks done")
    pids = worker_pids_of(zmr.gateway.status())
    assert len(pids) == 2
    assert client.status(zmr.sock, job_id)["state"] == "map"  # killed mid-map
    os.kill(pids[0], signal.SIGKILL)
    st = client.wait(zmr.sock, [job_id], timeout=180)[job_id]
    assert st["state"] == "complete", st.get("traceback")
    assert st["docs_read"] == N_BIG and st["chunks_done"] == st["chunks_total"]
    assert zmr.output("zagg.dkill") == expected(zmr.docs, lambda d: d["s"])
    wait_for(lambda: (lambda now: len(now) == 2 and pids[0] not in now)(
        worker_pids_of(zmr.gateway.status())), timeout=60,
        what="the nanny to start the killed worker again")


SMALL = expected(make_docs(N_SMALL), lambda d: d["s"])


def test_replace_leaves_exactly_the_results(zmr):
    zmr.db["zagg.rep"].insert_many([{"_id": "stale", "value": 1}, {"_id": "s0", "value": -1}])
    st = zmr.run(zmr.request((F.map_by_s, F.reduce_sum), input_name="small",
                             output_name="zagg.rep"))
    assert st["state"] == "complete", st.get("traceback")
    assert zmr.output("zagg.rep") == SMALL


def test_merge_overwrites_same_ids_keeps_others(zmr):
    zmr.db["zagg.mrg"].insert_many([{"_id": "other", "value": 1}, {"_id": "s0", "value": -1}])
    st = zmr.run(zmr.request((F.map_by_s, F.reduce_sum), input_name="small",
                             output_name="zagg.mrg", output_type="merge"))
    assert st["state"] == "complete", st.get("traceback")
    assert zmr.output("zagg.mrg") == {**SMALL, "other": 1}


def test_reduce_folds_into_existing_values(zmr):
    zmr.db["zagg.red"].insert_many([{"_id": "other", "value": 1}, {"_id": "s0", "value": 1000}])
    st = zmr.run(zmr.request((F.map_by_s, F.reduce_sum), input_name="small",
                             output_name="zagg.red", output_type="reduce"))
    assert st["state"] == "complete", st.get("traceback")
    assert zmr.output("zagg.red") == {**SMALL, "other": 1, "s0": SMALL["s0"] + 1000}
    # Running it again adds the same counts once more.
    zmr.run(zmr.request((F.map_by_s, F.reduce_sum), input_name="small",
                        output_name="zagg.red", output_type="reduce"))
    assert zmr.output("zagg.red") == {**{k: 2 * v for k, v in SMALL.items()}, "other": 1,
                                      "s0": 2 * SMALL["s0"] + 1000}


def test_write_paths_follow_the_server(zmr, expect_path):
    """replace builds aside and renames over the target where the server can; merge and
    reduce write with ReplaceOne upserts where the server takes them."""
    zmr.db["zagg.paths"].insert_one({"_id": "stale", "value": 1})
    st = zmr.run(zmr.request((F.map_by_s, F.reduce_sum), input_name="small",
                             output_name="zagg.paths"))
    expect_path("replace", st["write_path"])
    assert zmr.output("zagg.paths") == SMALL
    assert not [c for c in zmr.db.list_collection_names() if c.startswith("zmr.tmp.")]
    for output_type in ("merge", "reduce"):
        st = zmr.run(zmr.request((F.map_by_s, F.reduce_sum), input_name="small",
                                 output_name="zagg.paths", output_type=output_type))
        expect_path("overwrite", st["write_path"])
    assert zmr.output("zagg.paths") == {k: 2 * v for k, v in SMALL.items()}


@pytest.mark.parametrize("output_type", ["replace", "merge"])
def test_rewriting_many_existing_documents(zmr, output_type):
    # Hundreds of updates of existing documents: FerretDB hangs on one update
    # command with more than about 100 of them, so the router must never send one.
    want = expected(make_docs(N_SMALL), lambda d: "%s/%d" % (d["s"], d["i"] % 5))
    assert len(want) > 150
    out = f"zagg.many_{output_type}"
    for _ in range(2):
        st = zmr.run(zmr.request((F.map_by_s_i, F.reduce_sum), input_name="small",
                                 output_name=out, output_type=output_type))
        assert st["state"] == "complete", st.get("traceback")
    assert zmr.output(out) == want


def test_finalize_shapes_the_stored_documents(zmr):
    st = zmr.run(zmr.request((F.map_by_s, F.reduce_sum, F.finalize_double), input_name="small",
                             output_name="zagg.fin"))
    assert st["state"] == "complete", st.get("traceback")
    assert zmr.output("zagg.fin") == {k: {"n": v, "twice": 2 * v} for k, v in SMALL.items()}


def test_xmapreduce_reduce_mode(zmr):
    zmr.db["zagg.xr_by_s"].insert_one({"_id": "s1", "value": 5})
    st = zmr.run(zmr.request((F.xmap_two, F.xreduce_sum), xmr=True, input_name="small",
                             output_prefix="zagg.xr_", output_type="reduce"))
    assert st["state"] == "complete", st.get("traceback")
    assert zmr.output("zagg.xr_by_s") == {**SMALL, "s1": SMALL["s1"] + 5}


BROKEN = {
    "map raises": ((F.map_raises, F.reduce_sum), "map says boom"),
    "reduce raises": ((F.map_by_s, F.reduce_raises), "reduce says boom"),
    "finalize raises": ((F.map_by_s, F.reduce_sum, F.finalize_raises), "finalize says boom"),
}


@pytest.mark.parametrize("case", list(BROKEN) + ["syntax error"])
@pytest.mark.parametrize("output_type", ["replace", "reduce"])
def test_failing_job_leaves_output_and_cluster_serves_next(zmr, case, output_type):
    out = f"zagg.err_{uuid.uuid4().hex[:6]}"
    zmr.db[out].insert_one({"_id": "s0", "value": 42})
    if case == "syntax error":
        request = zmr.request((F.map_by_s, F.reduce_sum), input_name="small", output_name=out,
                              output_type=output_type)
        request["map_text"] = "def map_by_s(objects:\n    pass\n"
        needle = "SyntaxError"
    else:
        funcs, needle = BROKEN[case]
        request = zmr.request(funcs, input_name="small", output_name=out, output_type=output_type)
    st = zmr.run(request)
    assert st["state"] == "error"
    assert needle in st["traceback"]
    assert list(zmr.db[out].find()) == [{"_id": "s0", "value": 42}]
    ok = zmr.run(zmr.request((F.map_by_s, F.reduce_sum), input_name="small", output_name=out))
    assert ok["state"] == "complete", ok.get("traceback")
    assert zmr.output(out) == SMALL


def test_basic_job_returns_its_result(zmr):
    st = client.run(zmr.sock, client.basic_request(F.add, 2, 3, scale=10), timeout=60)
    assert st["state"] == "complete"
    assert st["result"] == {"sum": 50}
    st = zmr.run(client.basic_request(F.basic_raises))
    assert st["state"] == "error" and "basic says boom" in st["traceback"]


def test_wait_true_replies_when_the_job_ends(zmr):
    request = zmr.request((F.map_by_s, F.reduce_sum), input_name="small", output_name="zagg.w",
                          wait=True)
    other = wire.req_socket(zmr.uri)
    try:
        other.send(bson.encode(request))
        # Meanwhile the router answers others.
        assert client.call(zmr.sock, {"$command": "echo", "x": 1})["message"]["x"] == 1
        assert other.poll(120_000)
        reply = wire.decode(other.recv())
    finally:
        other.close(0)
    assert reply["status"]["state"] == "complete"
    assert zmr.output("zagg.w") == SMALL


def test_a_job_over_one_chunk_is_one_task(zmr):
    st = zmr.run(zmr.request((F.map_by_s, F.reduce_sum), input_name="small",
                             output_name="zagg.one"))
    assert st["state"] == "complete", st.get("traceback")
    assert (st["chunks_total"], st["chunks_done"], st["partitions_total"]) == (1, 1, 0)
    assert st["docs_read"] == N_SMALL and zmr.output("zagg.one") == SMALL


def test_inline_output_comes_back_in_the_status_and_nothing_is_written(zmr):
    st = zmr.run(zmr.request((F.map_by_s, F.reduce_sum), input_name="small",
                             output_name="zagg.inl", inline_max=1 << 20))
    assert st["state"] == "complete", st.get("traceback")
    assert st["write_path"] == "inline" and "zagg.inl" not in zmr.db.list_collection_names()
    [out] = st["inline"]
    assert (out["name"], out["coll"]) == ("zagg.inl", "")
    assert {d["_id"]: d["value"] for d in bson.decode_all(out["docs"])} == SMALL
    # An xmapreduce job: one entry per collection its map named.
    st = zmr.run(zmr.request((F.xmap_two, F.xreduce_sum), xmr=True, input_name="small",
                             output_prefix="zagg.xi_", inline_max=1 << 20))
    assert st["write_path"] == "inline"
    by = {o["coll"]: (o["name"], bson.decode_all(o["docs"])) for o in st["inline"]}
    assert sorted(by) == ["by_i", "by_s"] and by["by_s"][0] == "zagg.xi_by_s"
    assert {d["_id"]: d["value"] for d in by["by_s"][1]} == SMALL
    # Larger than inline_max: written as any replace job.
    st = zmr.run(zmr.request((F.map_by_s, F.reduce_sum), input_name="small",
                             output_name="zagg.inl", inline_max=100))
    assert st["write_path"] != "inline" and "inline" not in st
    assert zmr.output("zagg.inl") == SMALL


def test_status_with_wait_answers_when_the_job_ends(zmr):
    job_id = client.submit(zmr.sock, zmr.request((F.map_slow, F.reduce_sum),
                                                 input_name="small", output_name="zagg.lp"))
    t0 = time.monotonic()
    st = client.status(zmr.sock, job_id, wait=50)  # the job maps for 0.8 s
    assert st["state"] == "complete"  # the reply waited for the end of the job ...
    assert time.monotonic() - t0 < 40  # ... and came then, not after the 50 s
    r = wire.call(zmr.sock, {"$command": "status", "job_id": job_id, "wait": "soon"}, 10)
    assert "'wait'" in r["error"] and r["status"]["state"] == "complete"


def test_bad_requests_get_error_replies(zmr):
    raw = zmq.Context.instance().socket(zmq.REQ)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(zmr.uri)
    try:
        raw.send(b"this is not BSON")
        assert raw.poll(10_000)
        assert "error" in wire.decode(raw.recv())
    finally:
        raw.close(0)
    r = wire.call(zmr.sock, {"$command": "mapreduce", "reduce_text": "x", "reduce_name": "x"}, 10)
    assert "map_text" in r["error"]
    r = wire.call(zmr.sock, {"$command": "frobnicate"}, 10)
    assert "frobnicate" in r["error"]
    r = wire.call(zmr.sock, {"$command": "status", "job_id": "no-such-job"}, 10)
    assert "error" in r and r["status"]["state"] == "UNKNOWN"
    r = wire.call(zmr.sock, {"$command": "mapreduce", "map_text": "x", "map_name": "m",
                             "reduce_text": "y", "reduce_name": "r", "output_type": "sideways"}, 10)
    assert "output_type" in r["error"]
    echo = wire.call(zmr.sock, {"$command": "echo", "still": "here"}, 10)
    assert echo["message"]["still"] == "here"


def test_config_reply_gives_ports(zmr):
    router_only(zmr)
    r = wire.call(zmr.sock, {"$command": "config"}, 10)
    assert r["src_port"] > 0 and r["sink_port"] > 0 and r["reduce_count"] == 8


def test_router_unreachable_fails_fast_naming_req_uri():
    uri = f"tcp://127.0.0.1:{free_port()}"
    sock = wire.req_socket(uri)
    t0 = time.monotonic()
    with pytest.raises(wire.RouterTimeout) as e:
        client.status(sock, "x", timeout=1.0)
    sock.close(0)
    assert time.monotonic() - t0 < 5
    assert uri in str(e.value) and "zmr.req_uri" in str(e.value)


def test_zmr_clean_removes_job_files(zmr, tmp_path):
    router_only(zmr)
    root = tmp_path / "jobs"
    (root / "deadbeef").mkdir(parents=True)
    (root / "deadbeef" / "part-0001").write_bytes(b"x")
    path = write_config(str(tmp_path / "c.yaml"), {"zmr": {"job_root": str(root)}})
    out = run_zcmd(path, "zmr-clean", timeout=60)
    assert out.returncode == 0, out.stderr
    assert not (root / "deadbeef").exists()
