"""Fuzzing the HTTP surfaces with hypothesis: whatever comes in, the answer is a JSON
200/202/400/413 (never a 500 nor a dead server), nothing but the API's own query
shapes reaches MongoDB, and well-formed requests afterwards are all answered/stored.

The budget is the project's fuzz budget (:mod:`tests.strategies`): 60 derandomized
examples per test in ``make test``, many more random ones in ``make fuzz``.
"""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import fuzz_settings
from tests.support import wait_for
from tests.test_web_api import Commands, web  # noqa: F401 - the fixture
from tests.webtools import get, request, web_base
from zarkov.web.filters import ALLOWED

pytestmark = pytest.mark.fuzz
FUZZ = fuzz_settings(60)
OPERATORS = ["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$and", "$or", "$where",
             "$function", "$expr", "$accumulator", "$regex", "$exists", "$not", "$nor",
             "$elemMatch", "$date", "$text", "$jsonSchema", "$mod", "$size", "$all"]
ALLOWED_OPS = {op.strip() for op in ALLOWED.split(",")}

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
keys = st.one_of(st.sampled_from(OPERATORS + ["value", "_id", "_id.day", "a.b", "", "$", "."]),
                 st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=12)
junk_text = st.one_of(st.text(max_size=40), json_values.map(json.dumps),
                      st.sampled_from(["", "-1", "0", "1000", "1001", "2024-01-01",
                                       "2024-13-45", "zz", "-value", "$natural", "[]", "{}"]))


def used_operators(obj) -> set[str]:
    """Every $-key in a filter as sent."""
    out = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and k.startswith("$"):
                out.add(k)
            out |= used_operators(v)
    elif isinstance(obj, list):
        for v in obj:
            out |= used_operators(v)
    return out


@pytest.fixture
def app_client(web):  # noqa: F811 - the fixture imported above
    client, listener, db = web
    db["zagg.series"].insert_many([{"_id": f"2024-01-{d:02d}", "value": {"n": d}}
                                   for d in range(1, 11)])
    db["zagg.ranked"].insert_many([{"_id": {"k": i}, "value": i} for i in range(10)])
    return client, listener


def check_answer(r) -> None:
    assert r.status_code in (200, 400), (r.status_code, r.get_data()[:300])
    body = json.loads(r.get_data())
    if r.status_code == 400:
        assert body["error"].startswith(body["parameter"])


def check_sent(listener: Commands) -> None:
    for cmd in listener.named("find"):
        assert cmd["find"].startswith("zagg."), cmd
        assert used_operators(cmd.get("filter", {})) <= ALLOWED_OPS, cmd["filter"]
        assert set(cmd) <= {"find", "filter", "projection", "sort", "limit", "maxTimeMS",
                            "singleBatch", "lsid", "$db", "$clusterTime", "$readPreference"}, cmd
    listener.sent.clear()


def well_formed_queries_answer(client, listener) -> None:
    r = client.get("/q?c=series&b=2024-01-03&e=2024-01-05")
    assert r.status_code == 200 and [v for _, v in r.json["n"]] == [3, 4, 5]
    r = client.get("/qr", query_string={"c": "ranked", "f": '{"value": {"$in": [2, 7]}}'})
    assert [row["value"] for row in r.json["rows"]] == [7, 2]
    r = client.get("/qs", query_string={"q": '[{"c": "series", "n": 1}]'})
    assert r.json == [{"n": [[1704844800000, 10]]}]  # 2024-01-10
    check_sent(listener)


def test_fuzzed_queries_get_json_answers_and_send_only_allowed_filters(app_client):
    client, listener = app_client

    @FUZZ
    @given(params=st.dictionaries(st.sampled_from(["p", "c", "b", "e", "n", "f", "s", "l", "q",
                                                   "x"]), junk_text, max_size=5),
           endpoint=st.sampled_from(["/q", "/qs", "/qr"]))
    def fuzz(params, endpoint):
        check_answer(client.get(endpoint, query_string=params))
        check_sent(listener)
    fuzz()
    well_formed_queries_answer(client, listener)


def test_fuzzed_filters_reach_mongodb_only_as_allowed_shapes(app_client):
    client, listener = app_client

    @FUZZ
    @given(flt=json_values, sort=junk_text, limit=st.integers(-5, 2000).map(str))
    def fuzz(flt, sort, limit):
        check_answer(client.get("/qr", query_string={"c": "ranked", "f": json.dumps(flt),
                                                     "s": sort, "l": limit}))
        check_sent(listener)
    fuzz()
    well_formed_queries_answer(client, listener)


# -- events over HTTP, against a real zcmd web-server ----------------------------------------
@pytest.fixture
def web_server(procs, config_file, zconfig):
    path = config_file()
    procs.zcmd("web", path, "web-server")
    base = web_base(zconfig)
    wait_for(lambda: get(base, "/health").status == 200, what="zcmd web-server")
    return base, zconfig["journal"]


bodies = st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=300),
                   st.lists(st.fixed_dictionaries({"type": st.text(max_size=5)},
                                                  optional={"context": json_values,
                                                            "extra": json_values,
                                                            "timestamp": json_values}),
                            max_size=5).map(lambda v: json.dumps(v).encode()))


def test_fuzzed_event_bodies_and_beacons_then_good_events_are_all_stored(web_server, db, procs):
    base, journal = web_server
    accepted = 0

    @FUZZ
    @given(body=bodies, query=st.text(max_size=30), agent=st.text(max_size=30),
           forwarded=st.text(max_size=30))
    def fuzz(body, query, agent, forwarded):
        nonlocal accepted
        r = request(base, "POST", "/events", body, {"Content-Type": "application/json"})
        assert r.status in (202, 400), (r.status, body[:200], r.body[:200])
        reply = r.json()
        if r.status == 202:
            accepted += reply["accepted"]
        else:
            assert reply["error"].startswith(reply["parameter"])
        safe = lambda s: s.encode("latin-1", "replace").decode("latin-1").replace("\r", "") \
            .replace("\n", "")  # noqa: E731 - what http.client can put in a header
        r = request(base, "GET", "/beacon.gif?" + json.dumps(query)[1:-1].replace(" ", "%20")
                    .replace("#", "%23"), headers={"User-Agent": safe(agent),
                                                   "X-Forwarded-For": safe(forwarded)})
        assert r.status in (200, 400), r
        if r.status == 200:
            accepted += 1
    fuzz()
    good = [{"type": "after", "context": {"i": i}} for i in range(20)]
    for i in range(0, 20, 5):
        r = request(base, "POST", "/events", json.dumps(good[i:i + 5]).encode())
        assert r.status == 202 and r.json() == {"accepted": 5}
    accepted += 20

    def all_accounted_for():
        # Each accepted event is committed (stored, or already there: a fuzzed _id twice)
        # or set aside by the database (FerretDB refuses '.' and '$' in field names).
        refused = 0
        if os.path.exists(rejects):
            with open(rejects) as f:
                refused = sum(1 for line in f if json.loads(line)["source"] == "database")
        return get(base, "/events/rate").json()["totals"]["committed"] + refused == accepted
    rejects = os.path.join(journal, "rejects.jsonl")
    wait_for(all_accounted_for, timeout=60, what=f"all {accepted} accepted events committed")
    assert sorted(d["context"]["i"] for d in db.event.find({"type": "after"})) == list(range(20))
    assert "Traceback" not in procs.log("web")
