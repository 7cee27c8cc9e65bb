"""The Dask engine's own tests: faults (a worker or the scheduler killed mid-run, the
scheduler unreachable), security (addresses refused, TLS), packaging (Dask missing),
a ``local`` cluster, greenlets of a gevent-patched process, and the input split.

The map-reduce and aggregation tests that define correctness run on this engine too
(test_zmr_cluster.py, test_agg_engine.py, parametrized by engine).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading

import bson
import pytest

from tests import aggtools as A
from tests.dasktools import DaskCluster, Gateway, dask_config, dask_installed, make_tls
from tests.support import free_port, wait_for, write_config
from zarkov import config as C
from zarkov import storage, wire
from zarkov.config import ConfigError
from zarkov.positions import Range
from zarkov.storage.capabilities import ID_RANGE
from zarkov.zmr import client

pytestmark = pytest.mark.skipif(not dask_installed(), reason="dask is not installed")


@pytest.fixture
def dask(procs) -> DaskCluster:
    """A Dask scheduler and 2 worker processes of this test's own (it may kill them)."""
    return DaskCluster(procs).start()


@pytest.fixture
def dask_file(zconfig, tmp_path, dask):
    """A function writing the test's config on the Dask engine (changes merged)."""
    def write(zmr: dict | None = None, **top) -> str:
        cfg = dask_config({**zconfig, **top}, dask.address)
        cfg["zmr"].update(zmr or {})
        return write_config(str(tmp_path / "dask.yaml"), cfg)
    return write


def dask_pids(address: str) -> list[int]:
    """The pids of the scheduler's worker processes."""
    from distributed import Client
    with Client(address, timeout=5, set_as_default=False) as c:
        return sorted(c.run(os.getpid).values())


def untouched(db, before: dict) -> None:
    assert A.output(db) == before
    assert db.event.count_documents({"aggregates": A.NAME}) == 0
    A.assert_clean(db, all_flagged=False)


# -- faults --------------------------------------------------------------------------
def test_worker_killed_during_run_still_exact(db, procs, dask, dask_file):
    path = dask_file()
    A.register(db, task_name="my.slow.SlowTask")
    A.add_events(db, 300, seed=41)
    agg = procs.zcmd("agg", path, "aggregate", A.NAME, env=A.ENV)
    wait_for(lambda: A.running(db), timeout=60, what="the run's jobs")
    pids = dask_pids(dask.address)
    os.kill(pids[0], signal.SIGKILL)  # a worker inside slow_map (both are busy)
    assert agg.wait(120) == 0, procs.log("agg")
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


def test_scheduler_killed_mid_run_fails_and_next_run_is_exact(db, procs, dask, dask_file):
    path = dask_file()
    A.register(db, task_name="my.slow.SlowTask")
    A.add_events(db, 60, seed=42)  # a first run's output (20 ms an event in map)
    A.ok(A.aggregate(path, A.NAME))
    before = A.output(db)
    A.add_events(db, 100, keys="abq", seed=43)
    agg = procs.zcmd("agg", path, "aggregate", A.NAME, env=A.ENV)
    wait_for(lambda: A.running(db), timeout=60, what="the run's jobs")
    procs.kill(dask.scheduler, signal.SIGKILL)
    assert agg.wait(60) == 1, procs.log("agg")
    lines = [line for line in procs.log("agg").splitlines() if line.startswith("zcmd")]
    assert len(lines) == 1 and "scheduler" in lines[0] and "nothing was changed" in lines[0], \
        procs.log("agg")
    assert A.output(db) == before  # outputs not applied: rolled back
    assert db.event.count_documents({"aggregates": A.NAME}) == 60
    assert db.agg_run.count_documents({}) == 0
    procs.kill(dask.workers, signal.SIGKILL)
    dask.start()
    A.ok(A.aggregate(path, A.NAME))
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


def test_scheduler_unreachable_fails_in_one_line(db, zconfig, tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    path = write_config(str(tmp_path / "c.yaml"),
                        dask_config({**zconfig, "zmr": {**zconfig["zmr"],
                                                        "max_chunk_timeout": 3}}, address))
    db[A.TARGET].insert_one({"_id": "a", "value": 7})
    A.register(db)
    A.add_events(db, 30, seed=44)
    res = A.aggregate(path, A.NAME)
    assert res.returncode == 1, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"no Dask scheduler at {address}" in res.stderr
    assert "nothing was changed" in res.stderr
    untouched(db, {"a": 7})


# -- engine choice, packaging, local cluster -----------------------------------------
def test_article_example_on_a_local_cluster_with_engine_option(db, config_file):
    """``zmr.engine`` router in the file, ``--engine dask`` on the command line: the
    article's Task, unchanged, on a LocalCluster of 2 processes started for the run."""
    path = config_file(zmr={"dask_workers": 2})
    A.register(db)
    A.add_events(db, 300, seed=45)
    res = A.ok(A.aggregate(path, A.NAME, "--engine", "dask"))  # no router runs anywhere
    assert res.stdout.strip().startswith(f"{A.NAME}: 300 documents in ")
    A.add_events(db, 120, keys="aghz", seed=46, kind="logged")
    A.ok(A.aggregate(path, A.NAME, "--engine", "dask"))
    assert A.output(db) == A.python_count(db)
    res = A.ok(A.aggregate(path, A.NAME, "full", "--engine", "dask"))
    assert "420 documents" in res.stdout
    assert A.output(db) == A.python_count(db)
    A.assert_clean(db)


def test_local_cluster_workers_do_not_profile():
    """A ``local`` cluster serves no dashboard: its workers skip Dask's sampling
    profiler (about 10% of a scan task's time)."""
    import dask

    from zarkov.dask_engine.cluster import connect
    cfg = C.from_dict({"zmr": {"engine": "dask", "dask_scheduler": "local", "dask_workers": 1}})
    dask_client, cluster = connect(cfg, 60)
    try:
        seen = dask_client.run(lambda: dask.config.get("distributed.worker.profile.enabled"))
    finally:
        dask_client.close()
        assert cluster is not None
        cluster.close()
    assert list(seen.values()) == [False]


def test_without_dask_zcmd_says_what_to_install(db, config_file, tmp_path):
    shadow = tmp_path / "shadow" / "distributed"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'distributed'\")\n")
    A.register(db)
    A.add_events(db, 10, seed=47)
    path = os.pathsep.join([str(shadow.parent), A.ENV["PYTHONPATH"]])
    res = A.aggregate(config_file(), A.NAME, "--engine", "dask", env={"PYTHONPATH": path})
    assert res.returncode == 2
    assert res.stderr.strip() == ("zcmd: the Dask engine needs dask and distributed: "
                                  "pip install 'zarkov[dask]'")
    assert db.agg_run.count_documents({}) == 0


# -- security ------------------------------------------------------------------------
@pytest.mark.parametrize("address,needle", [
    ("tcp://scheduler.example:8786", "beyond loopback without TLS"),
    ("tcp://0.0.0.0:8786", "beyond loopback without TLS"),
    ("tls://127.0.0.1:8786", "needs security.dask_tls_ca"),
    ("scheduler:8786", "'local', tcp://host:port or tls://host:port"),
])
def test_scheduler_addresses_refused(db, zconfig, tmp_path, address, needle):
    """Refused before anything is sent (no connection is even tried): exit 2."""
    path = write_config(str(tmp_path / "c.yaml"), dask_config(zconfig, address))
    A.register(db)
    res = A.aggregate(path, A.NAME)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_engine_check_unit():
    from zarkov.dask_engine.link import check
    base = {"zmr": {"engine": "dask"}}
    check(C.from_dict({**base, "zmr": {"engine": "dask", "dask_scheduler": "tcp://127.0.0.1:1"}}))
    check(C.from_dict({"zmr": {"engine": "dask", "dask_scheduler": "tcp://[::1]:1"}}))
    check(C.from_dict({"zmr": {"engine": "dask", "dask_scheduler": "tcp://10.0.0.1:1"},
                       "security": {"allow_insecure": True}}))
    with pytest.raises(ConfigError, match="beyond loopback"):
        check(C.from_dict({"zmr": {"engine": "dask", "dask_scheduler": "tcp://10.0.0.1:1"}}))
    with pytest.raises(ConfigError, match="must be one of router, dask"):
        C.from_dict({"zmr": {"engine": "spark"}})


@pytest.mark.skipif(shutil.which("openssl") is None,
                    reason="openssl is needed to make test certificates")
def test_tls_local_cluster_runs_jobs(procs, zconfig, tmp_path, db):
    """With security.dask_tls_* set, the local cluster and the client speak TLS."""
    ca, cert, key = make_tls(tmp_path)
    cfg = dask_config({**zconfig, "security": {"dask_tls_ca": ca, "dask_tls_cert": cert,
                                               "dask_tls_key": key}}, "local")
    cfg["zmr"]["dask_workers"] = 1
    gw = Gateway(procs, write_config(str(tmp_path / "tls.yaml"), cfg))
    assert gw.status()["address"].startswith("tls://127.0.0.1:")
    db.event.insert_many([{"foo": f"k{i % 5}"} for i in range(500)])
    sock = wire.req_socket(gw.uri)
    try:
        st = client.run(sock, client.mapreduce_request(
            "def m(objects):\n    for o in objects:\n        yield o['foo'], 1\n",
            "def r(k, vs):\n    return sum(vs)\n", map_name="m", reduce_name="r",
            database=db.name, output_name="zagg.tls"), timeout=120)
    finally:
        sock.close(0)
    assert st["state"] == "complete"
    assert A.output(db, "zagg.tls") == {f"k{i}": 100 for i in range(5)}


# -- gevent --------------------------------------------------------------------------
GREENLETS = """
from gevent import monkey
monkey.patch_all()
import sys
import gevent
from zarkov import aggregation, config as C
cfg = C.load(sys.argv[1])
runs = [gevent.spawn(aggregation.run, cfg, name) for name in ("my_agg_def", "types")]
gevent.joinall(runs, raise_error=True)
print(sorted(g.value.docs for g in runs))
"""


def test_runs_in_greenlets_of_a_patched_process(db, dask_file, tmp_path):
    """As zcmd serve's real-time loop does: two runs at once in greenlets of a
    monkey-patched process, each through the process's gateway."""
    path = dask_file()
    A.register(db)
    A.register(db, "types", task_name="my.more.CountTypes")
    A.add_events(db, 150, seed=48, kind="logged")
    db.event.insert_many([{"foo": "a", "type": t} for t in ("x", "y", "y")])
    script = tmp_path / "greenlets.py"
    script.write_text(GREENLETS)
    env = {**os.environ, "PYTHONPATH": A.ENV["PYTHONPATH"]}
    res = subprocess.run([sys.executable, str(script), path], capture_output=True, text=True,
                         timeout=180, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[153, 153]"
    assert A.output(db) == A.python_count(db)
    assert A.output(db, "zagg.types") == {"test": 150, "x": 1, "y": 2}


def test_zcmd_serve_counts_in_real_time_on_dask_and_shows_the_jobs(procs, db, dask_file,
                                                                    zconfig):
    """zcmd serve with zmr.engine: dask: its real-time loop (greenlets) runs the AggDef
    through its own gateway; what is sent is counted once; the web service lists the
    Dask jobs beside the router's."""
    from tests.webtools import get, web_base
    from zarkov.client import ZarkovClient
    path = dask_file(realtime_interval=1)
    db.agg_def.insert_one({"name": "per_type", "object": "event", "realtime": True,
                           "task_name": "zarkov.examples.EventsPerTypePerDay"})
    proc = procs.zcmd("serve", path, "serve")
    base = web_base(zconfig)
    wait_for(lambda: get(base, "/health").status == 200, timeout=60, what="zcmd serve")
    client = ZarkovClient(zconfig["bson_uri"])
    sent = collections.Counter()
    for i in range(300):
        kind = ("login", "download", "create")[i % 3]
        client.event(kind, {"user": f"u{i % 7}"})
        sent[kind] += 1
    client.close()

    def counted() -> collections.Counter:
        out: collections.Counter = collections.Counter()
        for row in db["zagg.events_per_day"].find():
            out[row["_id"]["type"]] += row["value"]
        return out
    wait_for(lambda: counted() == sent, timeout=120, what="300 events counted on Dask")
    # Each job's line reaches dask_job as it ends (within the gateway's next loop).
    wait_for(lambda: sum(d["docs_read"] for d in db.dask_job.find({"state": "complete"}))
             == 300, timeout=30, what="the finished Dask jobs' lines")
    jobs = get(base, "/jobs").json()["jobs"]
    assert jobs and all(j["engine"] == "dask" and j["state"] == "complete" for j in jobs), jobs
    assert {j["aggdef"] for j in jobs} == {"per_type"}
    procs.kill(proc, signal.SIGTERM)
    assert proc.returncode == 0, procs.log("serve")[-2000:]


def test_dask_client_in_a_patched_process_is_broken():
    """The finding that shapes the design (docs/dask-engine.md): in a process that
    gevent has patched, a Dask Client's blocking calls return coroutines instead of
    results.  Should a Dask release fix it, this fails: the gateway process may then
    be reconsidered."""
    probe = ("from gevent import monkey; monkey.patch_all()\n"
             "from distributed import Client, LocalCluster\n"
             "if __name__ == '__main__':\n"
             "    c = Client(LocalCluster(n_workers=1, threads_per_worker=1, host='127.0.0.1',"
             " dashboard_address=None), timeout=20)\n"
             "    r = c.submit(abs, -3).result(timeout=20)\n"
             "    print(type(r).__name__)\n"
             "    c.close()\n")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120)
    assert res.stdout.strip().splitlines()[:1] != ["int"], res.stdout
    assert "coroutine" in res.stdout or res.returncode != 0, (res.stdout, res.stderr[-2000:])


# -- splitting the input ----------------------------------------------------------------
def test_sub_ranges_cover_a_range_once():
    from zarkov.dask_engine.split import piece_size, sub_ranges
    r = Range("ab" * 6, 10, 2510)
    subs = sub_ranges(r, 1000)
    assert [(s.after, s.upto) for s in subs] == [(10, 1010), (1010, 2010), (2010, 2510)]
    assert sum(len(s) for s in subs) == len(r)
    assert piece_size(100, 2) == 1000 and piece_size(10**7, 2) == 50_000


def _read_all(db, caps, names, query, every):
    from zarkov.dask_engine import split, tasks
    pieces = split.pieces(db, caps, names, query, threads=2, boundary_every=every)
    docs = []
    for p in pieces:
        if p[0] == "scan":
            chunks = tasks.scan_chunks(_uri(db), db.name, p, 1 << 20, 2)
            data = b"".join(c for c, _ in chunks)
        else:
            data = tasks.read_piece(_uri(db), db.name, p)
        docs += bson.decode_all(data)
    return pieces, docs


def _uri(db) -> str:
    host, port = db.client.address
    return f"mongodb://{host}:{port}/"


def test_pieces_read_every_document_once(db, server):
    """Ranges of positions become range pieces where reading them by id pays (the
    router's own test) and on MongoDB; another filter is one scan on the bundled
    servers and ``_id`` ranges where the server serves them (forced here: the pieces
    are right on any server, only slower on these)."""
    A.add_events(db, 2500, kind="logged", seed=49)
    A.add_events(db, 300, seed=50, jobs="run1")
    A.add_events(db, 100, seed=51)
    caps = storage.capabilities(db.client, db.name)
    [whole] = positions_of(db)
    few = Range(whole.stream, 0, 100)  # so few ids that reading them by id always pays
    cases = [(caps, [whole], 2800, {"scan"}), (caps, [few], 400, {"range", "scan"}),
             (dataclasses.replace(caps, id_reads=ID_RANGE), [whole], 2800, {"range", "query"})]
    for forced, ranges, n, kinds in cases:
        selection = {"$or": [r.clause() for r in ranges] + [{"jobs": "run1"}]}
        pieces, docs = _read_all(db, forced, ["event"], selection, every=120)
        ids = [d["_id"] for d in docs]
        assert len(ids) == len(set(ids)) == n
        assert {p[0] for p in pieces} == kinds, (forced.id_reads, ranges)
    pieces, docs = _read_all(db, dataclasses.replace(caps, id_reads=ID_RANGE), ["event"],
                             {"type": "test"}, every=700)
    assert len(docs) == len({d["_id"] for d in docs}) == 2900
    assert len(pieces) == 2900 // 700 + 1 and {p[0] for p in pieces} == {"query"}


def test_pieces_of_ids_of_several_types_fall_back_to_a_scan(db):
    db.event.insert_many([{"_id": i, "foo": "x"} for i in range(50)]
                         + [{"_id": f"s{i}", "foo": "y"} for i in range(50)])
    caps = dataclasses.replace(storage.capabilities(db.client, db.name), id_reads=ID_RANGE)
    pieces, docs = _read_all(db, caps, ["event"], {}, every=10)
    assert [p[0] for p in pieces] == ["scan"] and len(docs) == 100


def test_natural_slices_read_every_document_once_and_notice_a_shift(db):
    """Where natural-order slices cost what they return (mongo-java-server; forced
    elsewhere), a large filter is cut into two slices per worker thread; a document
    deleted before a boundary between two slices' reads makes them disagree."""
    from zarkov.dask_engine import split, tasks
    db.ev.insert_many([{"_id": i, "t": i % 3} for i in range(3000)])
    caps = dataclasses.replace(storage.capabilities(db.client, db.name), natural_slices=True)
    for query, n in (({}, 3000), ({"t": 1}, 1000)):
        pieces = split.pieces(db, caps, ["ev"], query, threads=3, slice_min=100)
        assert [p[0] for p in pieces] == ["slice"] * 6, query
        reads = [tasks.read_slice(_uri(db), db.name, p) for p in pieces]
        ids = [d["_id"] for data, _ in reads for d in bson.decode_all(data)]
        assert sorted(ids) == sorted(d["_id"] for d in db.ev.find(query)) and len(ids) == n
        assert split.slices_agree(pieces, [edges for _, edges in reads])
    assert [p[0] for p in split.pieces(db, caps, ["ev"], {}, threads=3)] == ["scan"]
    pieces = split.pieces(db, caps, ["ev"], {}, threads=2, slice_min=100)
    first = tasks.read_slice(_uri(db), db.name, pieces[0])
    db.ev.delete_one({"_id": 7})
    second = tasks.read_slice(_uri(db), db.name, pieces[1])
    assert not split.slices_agree(pieces, [first[1], second[1]])


def test_a_job_whose_slices_shifted_is_read_again_as_one_scan(db, monkeypatch):
    """A job over slices counts each document once; when a document is deleted while
    its slices are read, the job reads its input again as one scan, and every
    document left is counted once."""
    from distributed import Client, LocalCluster

    from zarkov.dask_engine import split, tasks
    from zarkov.dask_engine.job import DaskJob
    from zarkov.zmr.jobspec import JobSpec
    db.ev.insert_many([{"_id": i} for i in range(4000)])
    real_read, real_pieces = tasks.read_slice, split.pieces
    caps = dataclasses.replace(storage.capabilities(db.client, db.name), natural_slices=True)
    monkeypatch.setattr(split, "pieces", lambda db_, caps_, *a, **k:
                        real_pieces(db_, caps, *a, **{**k, "slice_min": 100}))
    reads, one_at_a_time, delete = [], threading.Lock(), threading.Event()

    def read_then_delete(uri, database, piece):
        with one_at_a_time:
            out = real_read(uri, database, piece)
            reads.append(piece[2]["skip"])
            if delete.is_set() and len(reads) == 1:  # between two slices' reads
                db.ev.delete_one({"_id": 7})         # before their boundary
        return out

    monkeypatch.setattr(tasks, "read_slice", read_then_delete)
    fns = {"map": ["def m(objects):\n    for o in objects:\n        yield o['_id'], 1\n", "m"],
           "reduce": ["def r(key, values):\n    return sum(values)\n", "r"]}
    spec = JobSpec(kind="mapreduce", fns=fns, database=db.name, input_names=["ev"],
                   inline_max=1 << 24)

    def counted() -> dict:
        job = DaskJob(spec, lambda: dc, _uri(db), db.client, 1 << 20, 2, "local")
        job.run()
        assert job.info["state"] == "complete", job.info.get("traceback")
        [out] = job.info["inline"]
        return {d["_id"]: d["value"] for d in bson.decode_all(out["docs"])}

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as dc:
        assert counted() == {i: 1 for i in range(4000)}
        assert sorted(reads) == [0, 1000, 2000, 3000]
        reads.clear()
        delete.set()
        assert counted() == {i: 1 for i in range(4000) if i != 7}
        assert sorted(reads) == [0, 1000, 2000, 3000]  # then one scan, not by slices


def positions_of(db) -> list[Range]:
    """The ranges of positions the test stream holds (from its first position)."""
    from zarkov import streams
    return [Range(s, 0, b) for s, b in streams.bounds(db, "event").items()]



def test_a_dask_job_whose_gateway_went_silent_is_shown_lost(db):
    """A zcmd aggregate SIGKILLed mid-job leaves its job's line 'running' in dask_job:
    past LOST_AFTER seconds without a write, /jobs shows it lost, naming the gateway."""
    from zarkov.dask_engine import registry
    db[registry.COLLECTION].insert_many([
        {"_id": "a" * 32, "kind": "mapreduce", "database": db.name, "state": "map",
         "phase": "map", "created": 1000.0, "ended": None, "seen": 1000.0,
         "gateway": {"host": "web-1", "pid": 4242}},
        {"_id": "b" * 32, "kind": "mapreduce", "database": db.name, "state": "map",
         "phase": "map", "created": 1010.0, "ended": None, "seen": 1020.0,
         "gateway": {"host": "web-1", "pid": 4343}},
        {"_id": "c" * 32, "kind": "mapreduce", "database": db.name, "state": "complete",
         "phase": "complete", "created": 900.0, "ended": 950.0, "seen": 950.0}])
    lines = registry.read(db, now=1000.0 + registry.LOST_AFTER + 5)
    assert [(j["job_id"][0], j["state"]) for j in lines] == [("b", "map"), ("a", "lost"),
                                                             ("c", "complete")]
    assert "pid 4242 on web-1" in lines[1]["error"]
