"""Fixtures: the database server, a throw-away database per test, Zarkov processes.

Tests talk to a real MongoDB-wire server over TCP: the one named by
ZARKOV_TEST_MONGO_URI (a real mongod, say), or else the bundled server named by
ZARKOV_TEST_SERVER (``ferretdb``, the default, or ``java``), which scripts/dev-db
starts.  ``make test`` runs the suite once per bundled server.  The server's name
and version are printed in pytest's header and in its summary line.

A test that touches no server (its fixtures do not include ``server``: unit tests,
in-process fuzzing, the multi-host tests with their own FerretDB) runs once per
``make test``: scripts/test-servers sets ``ZARKOV_TEST_SERVERLESS=skip`` for the runs
after the first, which then deselect it.

A test that cannot pass on one server says so with
``@pytest.mark.server_limit("<kind>", reason="<the server's limit>")``: it is then
expected to fail there (``xfail(strict=True)``), never skipped.
"""
from __future__ import annotations

import json
import os
import uuid

import pymongo
import pytest
import yaml

from tests.support import (
    EXPECTED_PATHS,
    PATHS_CHECKED,
    Cluster,
    PrivateServer,
    Processes,
    TestServer,
    free_port,
    test_server,
    test_server_if_known,
    write_config,
)


def pytest_report_header(config):
    server = test_server()
    return [f"server: {server.label} at {server.uri} ({server.how})"]


@pytest.hookimpl(trylast=True)  # after the terminal reporter is registered
def pytest_configure(config):
    # Each run's summary line names its server: "FerretDB-1.24.2: 117 passed in ...".
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    build_line = reporter.build_summary_stats_line

    def named_line():
        parts, color = build_line()
        server = test_server_if_known()
        if server is None and os.environ.get("ZARKOV_TEST_SERVER"):
            server = test_server()  # make test's runs always name theirs
        if server is not None and parts:
            (text, markup), *rest = parts
            parts = [(f"{server.word}: {text}", markup), *rest]
        return parts, color

    reporter.build_summary_stats_line = named_line


def pytest_collection_modifyitems(config, items):
    if os.environ.get("ZARKOV_TEST_SERVERLESS") == "skip":
        # Why: such a test gives the same result whatever the server; an earlier run
        # of make test ran it (see the module docstring).
        ran = [item for item in items if "server" not in item.fixturenames]
        if ran:
            config.hook.pytest_deselected(items=ran)
            items[:] = [item for item in items if "server" in item.fixturenames]
    for item in items:
        engine = getattr(item, "callspec", None) and item.callspec.params.get("engine")
        if engine not in (None, "router") and item.get_closest_marker("any_engine"):
            item.add_marker(pytest.mark.skip(
                reason="any_engine: the aggregation's own step, run on the router engine"))
        for mark in item.iter_markers("server_limit"):
            kind = mark.args[0]
            if test_server().kind == kind:
                item.add_marker(pytest.mark.xfail(strict=True,
                                                  reason=f"{kind}: {mark.kwargs['reason']}"))


def pytest_terminal_summary(terminalreporter):
    report = os.environ.get("ZARKOV_TEST_REPORT")
    if report:  # for scripts/test-servers' total
        counts = {k: len(terminalreporter.stats.get(k, ()))
                  for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
        with open(report, "w") as f:
            json.dump({"server": test_server().label, **counts}, f)
    if PATHS_CHECKED:
        server = test_server()
        terminalreporter.section(f"write paths checked on {server.label}")
        for test, what, path in PATHS_CHECKED:
            terminalreporter.line(f"{what:>10}: {path:<18} {test}")


@pytest.fixture
def expect_path(request, server):
    """``expect_path(what, got)``: assert that the write of kind ``what`` (replace,
    overwrite, move) took the path this server must take; listed in the summary."""
    def check(what: str, got: str) -> None:
        assert got == EXPECTED_PATHS[server.kind][what], (
            f"{server.label}: {what} took path {got!r}, expected "
            f"{EXPECTED_PATHS[server.kind][what]!r}")
        PATHS_CHECKED.append((request.node.nodeid, what, got))
    return check


@pytest.fixture(scope="session")
def server() -> TestServer:
    """The server under test: its kind (ferretdb, java, mongodb), URI and capabilities."""
    return test_server()


@pytest.fixture(scope="session")
def mongo_uri(server) -> str:
    """URI of the server the tests use (started by scripts/dev-db when none is given)."""
    return server.uri


@pytest.fixture(scope="session")
def mongo_client(mongo_uri):
    """One pymongo client for the test session."""
    client = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=10000)
    client.admin.command("ping")
    yield client
    client.close()


@pytest.fixture
def db_name(mongo_client) -> str:
    """A fresh database name, dropped when the test ends."""
    name = "zt_" + uuid.uuid4().hex[:12]
    yield name
    mongo_client.drop_database(name)


@pytest.fixture
def db(mongo_client, db_name):
    """The test's own database."""
    return mongo_client[db_name]


@pytest.fixture
def mim():
    """The model bound to Ming's in-memory database (``M.doc_session.db`` works): for
    pure unit tests only."""
    from zarkov import config as C
    from zarkov import model as M
    M.configure(C.from_dict({"mongo_uri": "mim://", "mongo_database": "zt_mim"}))
    yield M
    M.doc_session.db.client.drop_database("zt_mim")
    M._bound = None


@pytest.fixture
def procs(tmp_path):
    """Start processes with procs.start()/procs.zcmd(); all stopped at teardown."""
    p = Processes(str(tmp_path))
    yield p
    p.stop_all()


def make_config(tmp_dir, mongo_uri: str, db_name: str) -> dict:
    """A config dict on loopback ports of its own, database ``db_name``, dirs in ``tmp_dir``."""
    return {
        "mongo_uri": mongo_uri,
        "mongo_database": db_name,
        "bson_bind_address": f"tcp://127.0.0.1:{(bp := free_port())}",
        "bson_uri": f"tcp://127.0.0.1:{bp}",
        "json_bind_address": f"tcp://127.0.0.1:{free_port()}",
        "publish_bind_address": f"tcp://127.0.0.1:{free_port()}",
        "web_port": free_port(),
        "journal": os.path.join(tmp_dir, "journal"),
        "num_event_servers": 1,
        # Tests write events without a position straight into the database and expect
        # every run to take them (test_agg_positions.py tests the interval).
        "sweep_interval": 0,
        "zmr": {
            "req_uri": f"tcp://127.0.0.1:{(rp := free_port())}",
            "req_bind": f"tcp://127.0.0.1:{rp}",
            "worker_uri": "tcp://127.0.0.1",
            "job_root": os.path.join(tmp_dir, "zmr"),
            "reduce_count": 8,
            "processes_per_worker": 2,
            "local_workers": 2,
            "map_chunk_size": 200000,
            "max_chunk_timeout": 60,
        },
    }


def config_writer(base: dict, path: str):
    """A function writing ``base`` with changes (``zmr={…}`` merges) to ``path``."""
    def write(**changes) -> str:
        data = dict(base)
        for k, v in changes.items():
            if k == "zmr":
                data["zmr"] = {**base["zmr"], **v}
            else:
                data[k] = v
        return write_config(path, data)
    return write


@pytest.fixture
def zconfig(tmp_path, mongo_uri, db_name) -> dict:
    """A config dict on loopback ports of its own, the test database and tmp dirs.

    Tests may change it before writing it with ``config_file``.
    """
    return make_config(str(tmp_path), mongo_uri, db_name)


@pytest.fixture
def config_file(tmp_path, zconfig):
    """Write the (possibly edited) zconfig to a file; returns a function giving its path."""
    return config_writer(zconfig, str(tmp_path / "zarkov.yaml"))


@pytest.fixture
def cluster(procs, config_file):
    """A running router and a pool of 2 worker processes; yields the config path."""
    yield Cluster(procs, config_file()).start().path


# -- one cluster for a whole module --------------------------------------------------
@pytest.fixture(scope="module")
def module_procs(tmp_path_factory):
    """Like ``procs``, for processes that live as long as the test module."""
    p = Processes(str(tmp_path_factory.mktemp("procs")))
    yield p
    p.stop_all()


@pytest.fixture(scope="module")
def engine() -> str:
    """The map-reduce engine of ``shared_cluster``: ``router`` here; a module that
    overrides this fixture with params (tests/dasktools.engines()) runs on each."""
    return "router"


@pytest.fixture(scope="module")
def shared_cluster(module_procs, mongo_uri, tmp_path_factory, engine) -> Cluster:
    """A router and 2 worker processes serving every test of a module (a Cluster).

    For tests that do not kill them.  On the Dask engine (``engine`` fixture): a Dask
    scheduler and 2 workers, and ``zmr.engine: dask`` in the config.  The router
    takes the database from each job request, so each test still uses its own
    database: write the test's config with
    ``shared_config_file``.  ``zmr.max_chunk_timeout`` is short (4 s) so that a dead
    router is noticed fast; ``agg_lease_seconds`` is 30.
    """
    tmp = str(tmp_path_factory.mktemp("cluster"))
    base = make_config(tmp, mongo_uri, "zt_shared_cluster_unused")
    if engine == "dask":  # a Dask scheduler and 2 workers; zcmd starts its gateway
        from tests.dasktools import DaskAggCluster
        return DaskAggCluster(module_procs, base, tmp)
    path = config_writer(base, os.path.join(tmp, "zarkov.yaml"))(
        zmr={"max_chunk_timeout": 4}, agg_lease_seconds=30)
    return Cluster(module_procs, path).start()


@pytest.fixture
def shared_config_file(shared_cluster, tmp_path, db_name):
    """Like ``config_file``, for the module's shared cluster and this test's database.

    At teardown it waits until the router runs no job (a killed run's job could
    otherwise write into the test database after it is dropped).
    """
    with open(shared_cluster.path) as f:
        base = {**yaml.safe_load(f), "mongo_database": db_name}
    yield config_writer(base, str(tmp_path / "zarkov.yaml"))
    shared_cluster.wait_idle()


@pytest.fixture
def private_server(procs, tmp_path, server) -> PrivateServer:
    """A server of the kind under test that the test owns: kill it, start it again.

    Its data are kept on disk under the test's tmp dir (the java server in H2).
    """
    if server.kind not in ("ferretdb", "java"):
        pytest.skip(f"needs a bundled server the test can kill and restart; "
                    f"ZARKOV_TEST_MONGO_URI names a {server.label} it cannot")
    return PrivateServer(procs, server.kind, str(tmp_path / "db"))
