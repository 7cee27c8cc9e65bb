"""The seam between Zarkov and the server: capabilities and write strategies, on the
server under test (each path asserted per kind of server, see tests/support.py)."""
from __future__ import annotations

import dataclasses

import bson
import pymongo
import pytest

from zarkov import storage


def raw(docs):
    return [[bson.encode(d) for d in docs]]


def content(coll):
    """{_id: v}; a document _id as its str()."""
    return {d["_id"] if not isinstance(d["_id"], dict) else str(d["_id"]): d.get("v")
            for d in coll.find()}


@pytest.fixture
def writes(db):
    return storage.writes(db)


def test_capabilities_name_the_server_and_are_probed_once(mongo_uri, db, server):
    client = pymongo.MongoClient(mongo_uri)
    try:
        caps = storage.capabilities(client, db.name)
        assert caps.wire_version >= 9  # what pymongo 4.18+ talks to
        assert {"ferretdb": "FerretDB", "java": "mongo-java-server"}.get(
            server.kind, "MongoDB") == caps.server
        assert caps.version and caps.version in caps.label
        # Kept for the life of the client: the same object, no second probe.
        db.drop_collection("x")
        assert storage.capabilities(client, db.name) is caps
        # The probe left nothing behind.
        assert not [c for c in db.list_collection_names() if c.startswith(storage.PROBE_PREFIX)]
        # Another client probes again (and finds the same).
        other = pymongo.MongoClient(mongo_uri)
        try:
            again = storage.capabilities(other, db.name)
        finally:
            other.close()
        assert again == caps
    finally:
        client.close()


def test_capabilities_of_each_bundled_server(server):
    caps = server.caps
    if server.kind == "ferretdb":
        # FerretDB 1.24: no renames of dotted names, no dropTarget, and update
        # commands that wedge it past ~100 statements.
        assert (caps.renames_dotted, caps.renames_over, caps.bulk_updates) == (False, False, False)
        assert caps.update_batch < 100
        assert not caps.atomic_updates  # read-modify-write: runs lock marks and flags
    else:
        assert (caps.renames_dotted, caps.renames_over, caps.bulk_updates) == (True, True, True)
        assert caps.atomic_updates
    if server.kind == "java":
        assert (caps.mongodb_version, caps.wire_version) == ("5.0.0", 13)


@pytest.mark.server_limit("ferretdb", reason="FerretDB 1.24's renameCollection implements "
                         "no dropTarget (its issue 2565) and refuses names with a dot")
def test_the_server_renames_a_collection_over_another(db):
    """What a full run's rename over its target needs (storage falls back without it)."""
    db["zstage.r.1.0"].insert_one({"_id": 1})
    db["zagg.b"].insert_one({"_id": 2})
    db["zstage.r.1.0"].rename("zagg.b", dropTarget=True)
    assert content(db["zagg.b"]) == {1: None}


def test_overwrite_writes_over_same_ids_and_keeps_others(db, writes, expect_path):
    db["zagg.o"].insert_many([{"_id": "keep", "v": 1}, {"_id": "a", "v": -1}])
    written = []
    new = [{"_id": k, "v": i} for i, k in enumerate(["a", "b", {"doc": 1}])]
    path = writes.overwrite("zagg.o", raw(new), written.append)
    expect_path("overwrite", path)
    assert content(db["zagg.o"]) == {"keep": 1, "a": 0, "b": 1, str({"doc": 1}): 2}
    assert sum(written) == 3
    writes.overwrite("zagg.o", raw(new))  # twice: the same
    assert len(content(db["zagg.o"])) == 4


def test_overwrite_many_documents_in_one_call(db, writes):
    # More than 100 existing documents: an update command that large wedges FerretDB.
    db["zagg.m"].insert_many([{"_id": i, "v": 0} for i in range(2500)])
    writes.overwrite("zagg.m", raw([{"_id": i, "v": i} for i in range(2500)]))
    assert content(db["zagg.m"]) == {i: i for i in range(2500)}


def test_replace_builds_all_outputs_then_swaps_them_in(db, writes, expect_path):
    db["zagg.r1"].insert_many([{"_id": "stale", "v": 1}, {"_id": "a", "v": -1}])
    db["zagg.r2"].insert_one({"_id": "gone", "v": 1})
    path = writes.replace({"zagg.r1": raw([{"_id": "a", "v": 1}, {"_id": "b", "v": 2}]),
                           "zagg.r2": iter(())},
                          lambda t: f"zmr.tmp.test.{t}")
    expect_path("replace", path)
    assert content(db["zagg.r1"]) == {"a": 1, "b": 2}
    assert content(db["zagg.r2"]) == {}
    assert "zagg.r2" in db.list_collection_names()  # there, and empty
    assert not [c for c in db.list_collection_names() if c.startswith("zmr.tmp.")]


def test_replace_failing_while_building_leaves_targets(db, writes, server):
    db["zagg.f"].insert_one({"_id": "old", "v": 1})

    def failing():
        yield [bson.encode({"_id": "new", "v": 2})]
        raise RuntimeError("the job's spill file is unreadable")

    with pytest.raises(RuntimeError):
        writes.replace({"zagg.f": failing()}, lambda t: "zmr.tmp.fail")
    assert "zmr.tmp.fail" not in db.list_collection_names()
    if writes.caps.renames_over:  # built aside: the target is untouched
        assert content(db["zagg.f"]) == {"old": 1}
    else:  # in place: old or new documents, never none
        assert set(content(db["zagg.f"])) <= {"old", "new"} and content(db["zagg.f"])


def test_replace_from_a_staging_collection_is_idempotent(db, writes, expect_path):
    db["zagg.t"].insert_many([{"_id": "stale", "v": 1}, {"_id": "a", "v": -1}])
    db["zstage.r.1.0"].insert_many([{"_id": "a", "v": 1}, {"_id": "b", "v": 2}])
    batches = []
    path = writes.replace_from("zstage.r.1.0", "zagg.t", batches.append)
    expect_path("replace", path)
    assert batches, "the hook was not called"
    assert content(db["zagg.t"]) == {"a": 1, "b": 2}
    assert "zstage.r.1.0" not in db.list_collection_names()
    # An empty staging collection empties the target (which stays).
    db.create_collection("zstage.r.2.0")
    writes.replace_from("zstage.r.2.0", "zagg.t")
    assert "zagg.t" in db.list_collection_names() and content(db["zagg.t"]) == {}


def test_move_takes_documents_and_indexes(db, writes, expect_path):
    db.event.insert_many([{"_id": i, "v": i} for i in range(12000)])
    db.event.create_index("v", name="by_v")
    path = writes.move("event", "event.0", drop_source=False)
    expect_path("move", path)
    assert db["event.0"].count_documents({}) == 12000
    assert "by_v" in db["event.0"].index_information()
    assert db.event.count_documents({}) == 0


# -- the fallbacks, on every server ---------------------------------------------------
@pytest.fixture
def fallbacks(db, writes):
    """The strategies of a server that can neither rename nor take bulk updates."""
    return storage.Writes(db, dataclasses.replace(writes.caps, renames_dotted=False,
                                                  renames_over=False, bulk_updates=False))


def test_fallbacks_give_the_same_results(db, fallbacks):
    db["zagg.a"].insert_many([{"_id": "stale", "v": 1}, {"_id": "x", "v": -1}])
    assert fallbacks.overwrite("zagg.a", raw([{"_id": "x", "v": 1}])) == storage.DELETE_INSERT
    assert content(db["zagg.a"]) == {"stale": 1, "x": 1}
    db["zstage.f.1.0"].insert_many([{"_id": "x", "v": 2}, {"_id": "y", "v": 3}])
    assert fallbacks.replace_from("zstage.f.1.0", "zagg.a") == storage.REPLACED_IN_PLACE
    assert content(db["zagg.a"]) == {"x": 2, "y": 3}
    assert fallbacks.replace({"zagg.a": raw([{"_id": "z", "v": 4}])},
                             lambda t: "unused") == storage.REPLACED_IN_PLACE
    assert content(db["zagg.a"]) == {"z": 4}


def test_moving_documents_resumes_after_a_crash_half_way(db, fallbacks):
    db.event.insert_many([{"_id": i} for i in range(10)])
    db["event.1"].insert_many([{"_id": i} for i in range(4)])  # copied, not yet deleted
    assert fallbacks.move("event", "event.1") == storage.MOVED_DOCUMENTS
    assert sorted(d["_id"] for d in db["event.1"].find()) == list(range(10))
    assert "event" not in db.list_collection_names()
