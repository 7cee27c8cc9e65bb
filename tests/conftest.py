"""Fixtures: the database server, a throw-away database per test, Zarkov processes.

Tests talk to a real MongoDB-wire server over TCP: the one named by
ZARKOV_TEST_MONGO_URI, or else the bundled FerretDB that scripts/dev-db starts.
"""
from __future__ import annotations

import os
import subprocess
import uuid

import pymongo
import pytest

from tests.support import ROOT, Processes, free_port, wait_for, write_config


@pytest.fixture(scope="session")
def mongo_uri() -> str:
    """URI of the server the tests use (started here when none is given)."""
    uri = os.environ.get("ZARKOV_TEST_MONGO_URI")
    if not uri:
        out = subprocess.run([os.path.join(ROOT, "scripts", "dev-db"), "start"],
                             capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            pytest.exit(f"cannot start the bundled database: {out.stderr.strip()}", 3)
        uri = out.stdout.strip().splitlines()[-1]
    return uri


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
def procs(tmp_path):
    """Start processes with procs.start()/procs.zcmd(); all stopped at teardown."""
    p = Processes(str(tmp_path))
    yield p
    p.stop_all()


@pytest.fixture
def zconfig(tmp_path, mongo_uri, db_name) -> dict:
    """A config dict on loopback ports of its own, the test database and tmp dirs.

    Tests may change it before writing it with ``config_file``.
    """
    return {
        "mongo_uri": mongo_uri,
        "mongo_database": db_name,
        "bson_bind_address": f"tcp://127.0.0.1:{(bp := free_port())}",
        "bson_uri": f"tcp://127.0.0.1:{bp}",
        "json_bind_address": f"tcp://127.0.0.1:{free_port()}",
        "publish_bind_address": f"tcp://127.0.0.1:{free_port()}",
        "journal": str(tmp_path / "journal"),
        "num_event_servers": 1,
        "zmr": {
            "req_uri": f"tcp://127.0.0.1:{(rp := free_port())}",
            "req_bind": f"tcp://127.0.0.1:{rp}",
            "worker_uri": "tcp://127.0.0.1",
            "job_root": str(tmp_path / "zmr"),
            "reduce_count": 8,
            "processes_per_worker": 2,
            "local_workers": 2,
            "map_chunk_size": 200000,
            "max_chunk_timeout": 60,
        },
    }


@pytest.fixture
def config_file(tmp_path, zconfig):
    """Write the (possibly edited) zconfig to a file; returns a function giving its path."""
    def write(**changes) -> str:
        data = dict(zconfig)
        for k, v in changes.items():
            if k == "zmr":
                data["zmr"] = {**zconfig["zmr"], **v}
            else:
                data[k] = v
        return write_config(str(tmp_path / "zarkov.yaml"), data)
    return write


@pytest.fixture
def cluster(procs, config_file):
    """A running router and a pool of 2 worker processes; yields the config path."""
    from zarkov import wire
    path = config_file()
    procs.zcmd("router", path, "zmr-router")
    import yaml
    uri = yaml.safe_load(open(path))["zmr"]["req_uri"]
    wait_for(lambda: wire.request(uri, {"$command": "echo"}, timeout=1.0), timeout=30,
             what="the router to answer echo")
    procs.zcmd("worker", path, "zmr-worker")
    # status without a job id reports the worker processes heard from recently.
    wait_for(lambda: wire.request(uri, {"$command": "status"}, timeout=1.0).get("workers", 0) >= 2,
             timeout=30, what="2 worker processes to report to the router")
    yield path
