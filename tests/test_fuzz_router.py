"""Fuzzing the map-reduce router through a real ``zcmd zmr-router`` and its workers.

Every request must get exactly one reply, a wrong value in any field of a job request
an ``error`` that names the field; strangers' messages on the sink are dropped.  Each
test ends with :func:`still_serving`: the router answers, a real job computes the
right numbers, and no loop of the router or the workers hit an unexpected exception.
"""
from __future__ import annotations

import os
import uuid

import bson
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import make_config
from tests.strategies import (
    COMMANDS,
    bson_values,
    fuzz_settings,
    job_request,
    random_requests,
    sink_messages,
    wrong_field_requests,
)
from tests.support import Cluster, router_status, wait_for, write_config
from zarkov import wire
from zarkov.zmr.jobspec import STATUS_WAIT_LIMIT

pytestmark = pytest.mark.fuzz

TIMEOUT = 30.0  # seconds for one reply: the machine is shared


@pytest.fixture(scope="module")
def router(module_procs, mongo_uri, mongo_client, tmp_path_factory):
    """A router and two worker processes, the module's own database (and any database a
    fuzzed request made: they are dropped at the end)."""
    before = set(mongo_client.list_database_names())
    tmp = str(tmp_path_factory.mktemp("fuzz-router"))
    name = "zt_fuzzrouter_" + uuid.uuid4().hex[:8]
    cfg = make_config(tmp, mongo_uri, name)
    cfg["zmr"]["max_chunk_timeout"] = 10
    cluster = Cluster(module_procs, write_config(os.path.join(tmp, "zarkov.yaml"), cfg)).start()
    cluster.db = mongo_client[name]
    cluster.sock = wire.req_socket(cluster.uri)
    yield cluster
    cluster.sock.close(0)
    cluster.wait_idle()
    for db in set(mongo_client.list_database_names()) - before:
        mongo_client.drop_database(db)


def still_serving(cluster) -> None:
    """The router answers, counts no unexpected error, and a real job is right."""
    assert cluster.router.poll() is None and cluster.workers.poll() is None
    assert wire.request(cluster.uri, {"$command": "echo", "x": 1}, TIMEOUT)["message"]["x"] == 1
    token = uuid.uuid4().hex
    cluster.db.event.insert_many([{"type": f"t{i % 3}", "token": token} for i in range(30)])
    req = {**job_request("mapreduce", cluster.db.name), "output_name": f"zagg.{token}",
           "query": bson.encode({"token": token}), "wait": True}
    reply = wire.request(cluster.uri, req, 120)
    assert reply["status"]["state"] == "complete", reply
    assert {d["_id"]: d["value"] for d in cluster.db[f"zagg.{token}"].find()} == \
        {"t0": 10, "t1": 10, "t2": 10}
    # Forged heartbeats (the sink has no authentication) count until they age out.
    status = wait_for(lambda: (s := router_status(cluster.uri, TIMEOUT))["workers"] == 2 and s,
                      timeout=30, what="the two real worker processes, and only them")
    assert status["errors"] == 0, status
    assert status["worker_errors"] == 0, status


def test_fuzz_random_commands_and_fields(router):
    @fuzz_settings(100)
    @given(random_requests())
    def ask(request):
        reply = wire.call(router.sock, request, TIMEOUT)
        assert isinstance(reply, dict)
        if request["$command"] not in COMMANDS:
            assert "unknown command" in reply.get("error", "") or "no '$command'" in \
                reply.get("error", ""), reply
        elif request["$command"] == "echo":
            assert "message" in reply
    ask()
    still_serving(router)


def test_fuzz_wrong_type_in_every_field_of_job_requests(router):
    @fuzz_settings(150)
    @given(wrong_field_requests(router.db.name))
    def ask(case):
        request, field = case
        reply = wire.call(router.sock, request, TIMEOUT)
        assert f"'{field}'" in reply.get("error", ""), (field, request[field], reply)
    ask()
    still_serving(router)


def test_fuzz_status_with_any_job_id(router):
    @fuzz_settings(40)
    @given(bson_values(4))
    def ask(job_id):
        reply = wire.call(router.sock, {"$command": "status", "job_id": job_id}, TIMEOUT)
        assert reply["status"] == {"state": "UNKNOWN"} and "unknown job id" in reply["error"]
    ask()
    still_serving(router)


def test_fuzz_raw_frames_get_one_reply_each(router):
    """Any frames, BSON or not, from a DEALER: one reply per message, never silence."""
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(router.uri)
    try:
        @fuzz_settings(80)
        @given(st.lists(st.one_of(st.binary(max_size=64), random_requests().map(bson.encode)),
                        min_size=1, max_size=4))
        def send(frames):
            dealer.send_multipart(frames)
            assert dealer.poll(TIMEOUT * 1000), f"no reply to {frames!r}"
            reply = dealer.recv_multipart()
            assert isinstance(wire.decode(reply[-1]), dict)
            assert not dealer.poll(0), "two replies to one message"
        send()
    finally:
        dealer.close(0)
    still_serving(router)


def test_fuzz_status_wait_of_any_value(router):
    """``status`` with ``wait`` (a long poll): none or seconds from 0 to 60, or an error
    naming the field; the job has ended, so a valid wait is answered at once."""
    job = wire.call(router.sock, {**job_request("basic", router.db.name), "wait": True},
                    TIMEOUT)
    assert job["status"]["state"] == "complete", job

    @fuzz_settings(40)
    @given(bson_values(4))
    def ask(wait):
        reply = wire.call(router.sock, {"$command": "status", "job_id": job["job_id"],
                                        "wait": wait}, TIMEOUT)
        assert reply["status"]["state"] == "complete", reply
        valid = wait is None or (type(wait) in (int, float)
                                 and 0 <= wait <= STATUS_WAIT_LIMIT)
        assert ("error" not in reply) if valid else ("'wait'" in reply["error"]), (wait, reply)
    ask()
    still_serving(router)


def test_fuzz_sink_from_a_stranger(router):
    """Forged heartbeats and replies on the workers' sink port are dropped."""
    ports = wire.request(router.uri, {"$command": "config"}, TIMEOUT)
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.connect(f"tcp://127.0.0.1:{ports['sink_port']}")
    sent = 0
    try:
        @fuzz_settings(100)
        @given(sink_messages())
        def send(frames):
            nonlocal sent
            push.send_multipart(frames)
            sent += 1
        send()
    finally:
        push.close()
    wait_for(lambda: router_status(router.uri, TIMEOUT)["sink_dropped"] > 0, timeout=30,
             what="the forged messages dropped")
    still_serving(router)


def test_fuzz_tasks_socket_from_a_stranger(router):
    """Forged requests for tasks, replies and goodbyes on the workers' tasks port are
    dropped, or cost no more than a worker process that left: what a stranger that
    asked for tasks holds goes to the real workers once its connection closes."""
    ports = wire.request(router.uri, {"$command": "config"}, TIMEOUT)
    dropped = router_status(router.uri, TIMEOUT)["sink_dropped"]
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 5000)
    dealer.connect(f"tcp://127.0.0.1:{ports['src_port']}")
    try:
        @fuzz_settings(100)
        @given(sink_messages())
        def send(frames):
            dealer.send_multipart(frames)
        send()
    finally:
        dealer.close()
    wait_for(lambda: router_status(router.uri, TIMEOUT)["sink_dropped"] > dropped,
             timeout=30, what="the forged messages dropped")
    still_serving(router)
