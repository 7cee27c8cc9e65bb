"""The JSON query API against the real database, through the WSGI app (no HTTP server):
the README's /q and friends, what each bad input answers, what reaches MongoDB, access."""
from __future__ import annotations

import datetime as dt

import pymongo
import pytest
from pymongo import monitoring

from zarkov import config as C
from zarkov.aggregation import status as agg_status
from zarkov.web.app import create_app
from zarkov.web.events import client_address
from zarkov.web.filters import FilterError, check_filter
from zarkov.web.timekeys import key_millis

MS = 1000


def ms(*args) -> int:
    return int(dt.datetime(*args, tzinfo=dt.timezone.utc).timestamp() * MS)


class Commands(monitoring.CommandListener):
    """Every command the app's client sends, by name."""

    def __init__(self):
        self.sent: list[tuple[str, dict]] = []

    def started(self, event):
        self.sent.append((event.command_name, dict(event.command)))

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass

    def named(self, *names: str) -> list[dict]:
        return [c for n, c in self.sent if n in names]


@pytest.fixture
def web(mongo_uri, db_name, db, tmp_path):
    """(test client, command listener, database) of an app over the test database."""
    listener = Commands()
    client = pymongo.MongoClient(mongo_uri, event_listeners=[listener])
    cfg = C.from_dict({"mongo_uri": mongo_uri, "mongo_database": db_name,
                       "journal": str(tmp_path / "journal")})
    app = create_app(cfg, client=client)
    yield app.test_client(), listener, db
    client.close()


def make_app(mongo_uri, db_name, tmp_path, **cfg):
    return create_app(C.from_dict({"mongo_uri": mongo_uri, "mongo_database": db_name,
                                   "journal": str(tmp_path / "journal"), **cfg})).test_client()


# -- /q as the README says ------------------------------------------------------------
def test_q_returns_each_value_field_as_sorted_key_millis_pairs_within_the_inclusive_range(web):
    client, _, db = web
    days = [21, 24, 22, 23, 20, 25]  # inserted out of order
    db["zagg.downloads"].insert_many(
        [{"_id": f"sf.net:2011-07-{d}", "value": {"downloads": d * 10, "users": d}} for d in days]
        + [{"_id": f"other:2011-07-{d}", "value": {"downloads": 1}} for d in days])
    r = client.get("/q", query_string={"c": "downloads", "b": "sf.net:2011-07-21",
                                       "e": "sf.net:2011-07-24"})
    assert r.status_code == 200, r.json
    assert r.json == {
        "downloads": [[ms(2011, 7, d), d * 10] for d in (21, 22, 23, 24)],
        "users": [[ms(2011, 7, d), d] for d in (21, 22, 23, 24)]}


def test_q_prefix_parameter_scalar_values_and_keys_that_are_not_times(web):
    client, _, db = web
    db["zagg.x.counts"].insert_many([{"_id": k, "value": v} for k, v in
                                     (("beta", 2), ("alpha", 1), ("gamma", 3))])
    r = client.get("/q?p=zagg.x.&c=counts&b=alpha&e=beta")
    assert r.json == {"value": [["alpha", 1], ["beta", 2]]}
    assert client.get("/q?c=x.counts").json == {"value": [["alpha", 1], ["beta", 2], ["gamma", 3]]}


def test_q_datetime_keys_iso_bounds_and_the_last_n_keys(web):
    client, _, db = web
    db["zagg.hourly"].insert_many([{"_id": dt.datetime(2024, 5, 1, h), "value": {"n": h}}
                                   for h in range(24)])
    r = client.get("/q?c=hourly&b=2024-05-01T10:00&e=2024-05-01T12:00Z")
    assert r.json == {"n": [[ms(2024, 5, 1, h), h] for h in (10, 11, 12)]}
    assert client.get("/q?c=hourly&n=2").json == {"n": [[ms(2024, 5, 1, h), h] for h in (22, 23)]}
    assert client.get("/q?c=hourly&b=2024-05-01T23:00").json == {"n": [[ms(2024, 5, 1, 23), 23]]}
    r = client.get("/q?c=hourly&e=yesterday")
    assert r.status_code == 400 and r.json["parameter"] == "e" and "datetimes" in r.json["error"]


def test_qs_answers_several_series_in_order(web):
    client, _, db = web
    db["zagg.a"].insert_many([{"_id": f"2020-01-0{d}", "value": d} for d in range(1, 5)])
    db["zagg.b"].insert_many([{"_id": "k", "value": {"f": 1}}])
    r = client.get("/qs", query_string={"q": '[{"c": "a", "b": "2020-01-02", "e": "2020-01-03"},'
                                             ' {"c": "b"}]'})
    assert r.status_code == 200, r.json
    assert r.json == [{"value": [[ms(2020, 1, 2), 2], [ms(2020, 1, 3), 3]]}, {"f": [["k", 1]]}]


def test_qr_ranks_with_a_filter_a_sort_and_a_limit(web):
    client, listener, db = web
    db["zagg.per_project"].insert_many(
        [{"_id": {"project": f"p{i}", "day": dt.datetime(2024, 1, 1 + i % 2)}, "value": i}
         for i in range(10)])
    listener.sent.clear()
    flt = '{"_id.day": {"$date": "2024-01-02"}, "value": {"$gte": 3, "$lt": 9}}'
    r = client.get("/qr", query_string={"c": "per_project", "f": flt, "s": "-value", "l": "2"})
    assert r.status_code == 200, r.json
    assert [row["value"] for row in r.json["rows"]] == [7, 5]
    assert r.json["rows"][0]["_id"] == {"project": "p7", "day": "2024-01-02T00:00:00.000Z"}
    (find,) = listener.named("find")
    assert find["filter"] == {"_id.day": dt.datetime(2024, 1, 2), "value": {"$gte": 3, "$lt": 9}}
    assert find["sort"] == {"value": -1} and find["limit"] == 2
    assert client.get("/qr?c=per_project").json["rows"][0]["value"] == 9  # default: -value, 10


def test_collections_lists_zagg_only_with_counts_and_whether_keys_are_times(web):
    client, _, db = web
    db["zagg.times"].insert_many([{"_id": f"x:2024-01-0{d}", "value": 1} for d in range(1, 4)])
    db["zagg.names"].insert_many([{"_id": n, "value": 1} for n in ("a", "b")])
    db["event"].insert_one({"type": "x"})
    db["zstage.r.1.0"].insert_one({"_id": 1})
    r = client.get("/collections").json["collections"]
    assert [(c["name"], c["c"], c["count"], c["keys"]) for c in r] == [
        ("zagg.names", "names", 2, "other"), ("zagg.times", "times", 3, "time")]
    times = r[1]
    assert (times["first_ms"], times["last_ms"]) == (ms(2024, 1, 1), ms(2024, 1, 3))


# -- bad input ------------------------------------------------------------------------
BAD = [
    ("/q?c=nope", "c", "no collection"),
    ("/q?c=agg_def&p=", "c", "no collection"),         # empty p: the default prefix
    ("/q?p=agg_&c=def", "p", "must start with 'zagg.'"),
    ("/q?p=&c=agg_def&p=x", "c", "no collection"),
    ("/q?c=series&p=zagg.series%00", "p", "not a usable string"),
    ("/q?c=series&b=2024-01-03&e=2024-01-01", "b", "after end"),
    ("/q?c=series&b=b&e=a", "b", "after end"),
    ("/q?c=series&n=0", "n", "from 1 to"),
    ("/q", "c", "required"),
    ("/q?c=series&begin=1", "begin", "unknown parameter"),
    ("/qs?q=not json", "q", "malformed JSON"),
    ("/qs?q=[]", "q", "non-empty JSON list"),
    ('/qs?q=[{"c": "series", "b": 1}]', "q[0].b", "must be a string"),
    ('/qs?q=[{"c": "series"}, {"c": "zz"}]', "q[1].c", "no collection"),
    ('/qs?q=[{"c": "series", "$where": "1"}]', "q[0].$where", "unknown parameter"),
    ("/qr?c=series&l=0", "l", "from 1 to 1000"),
    ("/qr?c=series&l=1001", "l", "from 1 to 1000"),
    ("/qr?c=series&l=ten", "l", "from 1 to 1000"),
    ("/qr?c=series&f={nope", "f", "malformed JSON"),
    ("/qr?c=series&f=[1]", "f", "must be a JSON object"),
    ('/qr?c=series&f={"$where": "sleep(1000)"}', "f", "'$where' is not allowed"),
    ('/qr?c=series&f={"value": {"$function": {"body": "x"}}}', "f", "'$function' is not allowed"),
    ('/qr?c=series&f={"$expr": {"$gt": ["$value", 1]}}', "f", "'$expr' is not allowed"),
    ('/qr?c=series&f={"value": {"$accumulator": {}}}', "f", "'$accumulator' is not allowed"),
    ('/qr?c=series&f={"value": {"$regex": "a"}}', "f", "'$regex' is not allowed"),
    ('/qr?c=series&f={"$or": [{"value": 1}, {"$where": "1"}]}', "f", "'$where' is not allowed"),
    ('/qr?c=series&f={"value": {"$eq": {"$where": "1"}}}', "f", "not allowed in a value"),
    ('/qr?c=series&f={"value": {"$gt": 1, "x": 2}}', "f", "cannot be mixed"),
    ('/qr?c=series&f={"$and": []}', "f", "non-empty list"),
    ('/qr?c=series&f={"a..b": 1}', "f", "field path"),
    ('/qr?c=series&f={"_id.$x": 1}', "f", "field path"),
    ("/qr?c=series&s=$natural", "s", "not a field to sort by"),
    ("/qr?c=series&s=a,b,c,d", "s", "at most three"),
    ("/collections?x=1", "x", "unknown parameter"),
    ("/events/rate?minutes=0", "minutes", "from 1 to 30"),
]


@pytest.mark.parametrize("path, parameter, message", BAD)
def test_bad_input_is_a_400_naming_the_parameter_and_sends_no_query(web, path, parameter, message):
    client, listener, db = web
    db["zagg.series"].insert_one({"_id": "2024-01-01", "value": 1})
    listener.sent.clear()
    r = client.get(path)
    assert r.status_code == 400, r.json
    assert r.json["parameter"] == parameter and message in r.json["error"], r.json
    assert r.json["error"].startswith(parameter)
    queried = [c for n, c in listener.sent if n not in ("listCollections", "isMaster", "hello",
                                                         "endSessions")]
    assert queried == [], queried


def test_a_deep_sort_path_is_fine_and_a_wrong_method_is_a_json_405(web):
    client, _, db = web
    db["zagg.series"].insert_one({"_id": "a", "value": 1})
    r = client.get("/qr?c=series&s=value.a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s.t.u.v.w.x.y.z")
    assert r.status_code == 200  # a deep path is allowed and harmless
    r = client.post("/q?c=series")
    assert r.status_code == 405 and "error" in r.json


# -- the filter checker and key recogniser, alone -----------------------------------
@pytest.mark.parametrize("flt", [
    {"a": 1}, {"a": {"$in": [1, "x", None]}}, {"$or": [{"a": 1}, {"$and": [{"b": {"$ne": 2}}]}]},
    {"a.b": {"$gte": 1.5, "$lte": 2}}, {"a": {"b": [1, {"c": 2}]}},
])
def test_allowed_filters_pass_unchanged(flt):
    assert check_filter(flt) == flt


@pytest.mark.parametrize("flt", [
    {"$where": "1"}, {"a": {"$exists": True}}, {"a": {"$not": {"$gt": 1}}}, {"a": {"$in": 1}},
    {"a": {"$elemMatch": {"b": 1}}}, {"$nor": [{"a": 1}]}, {"$text": {"$search": "x"}},
    {"a": [{"$where": 1}]}, {"a": {"$eq": [{"$expr": 1}]}}, {"": 1}, {"a": float("nan")},
    {"a": {"$date": "soon"}}, 5, [{"a": 1}],
])
def test_refused_filters(flt):
    with pytest.raises(FilterError):
        check_filter(flt)


def test_key_millis_reads_time_keys_only():
    assert key_millis("2011-07-22") == ms(2011, 7, 22)
    assert key_millis("sf.net:2011-07-22T10:05") == ms(2011, 7, 22, 10, 5)
    assert key_millis("a/2011-07-22 10:05:30.250Z") == ms(2011, 7, 22, 10, 5, 30) + 250
    assert key_millis("2011-07-22T12:00+02:00") == ms(2011, 7, 22, 10)
    assert key_millis(dt.datetime(2011, 7, 22)) == ms(2011, 7, 22)
    for not_time in ("2011-13-01", "12011-07-22", "2011-07-22x", "abc", 5, None, {"a": 1}):
        assert key_millis(not_time) is None, not_time


def test_client_address_believes_forwarded_for_only_from_trusted_proxies():
    import ipaddress
    proxies = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32"))
    assert client_address("192.0.2.7", "198.51.100.1", proxies) == "192.0.2.7"
    assert client_address("127.0.0.1", "198.51.100.1", proxies) == "198.51.100.1"
    assert client_address("127.0.0.1", "6.6.6.6, 198.51.100.1, 10.1.2.3", proxies) == "198.51.100.1"
    assert client_address("127.0.0.1", "junk, 10.1.2.3", proxies) == "10.1.2.3"
    assert client_address("127.0.0.1", None, proxies) == "127.0.0.1"


# -- status ---------------------------------------------------------------------------
def test_aggdefs_shows_last_run_last_error_and_running_only_under_a_held_lease(web):
    client, _, db = web
    db.agg_def.insert_many([{"name": "b_agg", "task_name": "m.T", "realtime": True},
                            {"name": "a_agg", "task_name": "m.U", "object": "ev2"}])

    class Result:
        seconds, docs, run_id, resumed = 1.5, 42, "r1", None

    class Nothing:
        seconds, docs, run_id, resumed = 0.1, 0, "r2", None
    agg_status.Recorder(db, "a_agg", False).done(Result())
    agg_status.Recorder(db, "a_agg", False).done(Nothing())  # a real-time run: nothing new
    agg_status.Recorder(db, "b_agg", True).failed("b_agg: boom")
    db.agg_status.update_one({"_id": "b_agg"}, {"$set": {"running": {
        "phase": "marking", "docs": 7, "pid": 1, "host": "elsewhere"}}})
    rows = {a["name"]: a for a in client.get("/aggdefs").json["aggdefs"]}
    assert list(rows) == ["a_agg", "b_agg"]
    a = rows["a_agg"]
    assert a["last"]["docs"] == 0 and a["last"]["run_id"] == "r2"
    assert a["last_work"]["docs"] == 42 and a["last_work"]["seconds"] == 1.5
    assert a["object"] == "ev2" and a["realtime"] is False and a["last_error"] is None
    assert rows["b_agg"]["last_error"]["message"] == "b_agg: boom"
    assert rows["b_agg"]["running"] is None  # no lease: a dead run's leftover
    future = dt.datetime.utcnow() + dt.timedelta(minutes=5)
    lease = {"_id": "b_agg", "token": "t", "host": "elsewhere", "pid": 1,
             "taken": dt.datetime.utcnow(), "expires": future}
    db.agg_lease.insert_one(lease)
    running = client.get("/aggdefs").json["aggdefs"][1]["running"]
    assert running["phase"] == "marking" and running["docs"] == 7
    db.agg_lease.update_one({"_id": "b_agg"}, {"$set": {"pid": 2}})  # another run holds it
    assert client.get("/aggdefs").json["aggdefs"][1]["running"] is None


def test_jobs_says_when_the_router_does_not_answer(web):
    client, _, _ = web
    r = client.get("/jobs")
    assert r.status_code == 200
    assert r.json["router"]["ok"] is False and r.json["jobs"] == []


# -- access ---------------------------------------------------------------------------
TOKEN = "s3cret-token-0123456789"


def test_with_a_token_the_api_and_dashboard_need_it_and_events_do_not(mongo_uri, db_name,
                                                                      tmp_path, db):
    client = make_app(mongo_uri, db_name, tmp_path, web_token=TOKEN)
    for path in ("/", "/collections", "/q?c=x", "/aggdefs", "/jobs", "/events/rate",
                 "/static/dashboard.js"):
        r = client.get(path)
        assert r.status_code == 401 and r.json["parameter"] == "Authorization", path
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/collections", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/collections",
                      headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get("/health").status_code in (200, 503)
    assert client.get("/beacon.gif").status_code in (200, 503)
    # A browser: /?token= sets a cookie and drops the token from the address.
    r = client.get(f"/?token={TOKEN}")
    assert r.status_code == 303 and r.headers["Location"].endswith("/")
    assert "zarkov_token=" in r.headers["Set-Cookie"] and "HttpOnly" in r.headers["Set-Cookie"]
    assert client.get("/collections").status_code == 200  # the test client kept the cookie
    assert client.get("/").status_code == 200


def test_without_a_token_only_loopback_host_names_are_served(mongo_uri, db_name, tmp_path, db):
    client = make_app(mongo_uri, db_name, tmp_path)
    assert client.get("/collections", headers={"Host": "localhost:8081"}).status_code == 200
    assert client.get("/collections", headers={"Host": "[::1]:8081"}).status_code == 200
    r = client.get("/collections", headers={"Host": "attacker.example:8081"})
    assert r.status_code == 403 and r.json["parameter"] == "Host"
    proxied = make_app(mongo_uri, db_name, tmp_path, web_trusted_proxies=["127.0.0.1"])
    assert proxied.get("/collections", headers={"Host": "stats.example"},
                       environ_base={"REMOTE_ADDR": "127.0.0.1"}).status_code == 200


def test_the_dashboard_page_loads_everything_from_this_service(web):
    client, _, _ = web
    page = client.get("/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert "http://" not in html and "https://" not in html and "//" not in html.replace("://", "")
    js = client.get("/static/dashboard.js")
    assert js.status_code == 200 and b"Plotly.react" in js.data
    plotly_url = html.split('<script src="')[1].split('"')[0]
    assert plotly_url.startswith("/static/vendor/plotly-")
    lib = client.get(plotly_url)
    assert lib.status_code == 200 and b"plotly.js v" in lib.data[:200]
    zipped = client.get(plotly_url, headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["Content-Encoding"] == "gzip" and len(zipped.data) < len(lib.data) / 2
    assert client.get("/static/../setup.py").status_code == 404


def test_aggdefs_shows_each_aggdefs_lag_from_reads_by_id(web):
    from bson import ObjectId

    from tests import aggtools as A
    from zarkov import positions
    client, listener, db = web
    db.agg_def.insert_many([{"name": "current", "task_name": "m.T"},
                            {"name": "lagging", "task_name": "m.T"}])
    now = dt.datetime.utcnow().replace(microsecond=0)
    A.add_events(db, 10, kind="logged", timestamp=now - dt.timedelta(seconds=120))
    A.add_events(db, 5, kind="logged", timestamp=now - dt.timedelta(seconds=10))
    A.add_events(db, 1000)  # history without positions: not read for the lag
    stream = positions.key(A.logger_stream(db).stream)
    A.count_all_logged(db, "current")
    db.agg_position.insert_one({"_id": "lagging", "streams": {stream: 10}})
    listener.sent.clear()
    rows = {a["name"]: a["lag"] for a in client.get("/aggdefs").json["aggdefs"]}
    assert rows["current"] == {"waiting": 0, "oldest_age": None, "late": False}
    lag = rows["lagging"]
    assert lag["waiting"] == 5 and 10 <= lag["oldest_age"] < 60 and lag["late"] is False
    # Cheap at any history size: the event collection is read by _id alone.
    finds = [c["filter"] for c in listener.named("find") if c["find"] == "event"]
    assert finds and all(list(f) == ["_id"] and isinstance(f["_id"], ObjectId) for f in finds)
    db.agg_position.update_one({"_id": "lagging"}, {"$set": {"streams": {stream: 3}}})
    lag = {a["name"]: a["lag"] for a in client.get("/aggdefs").json["aggdefs"]}["lagging"]
    assert lag["waiting"] == 12 and lag["oldest_age"] >= 120 and lag["late"] is True


def test_the_event_rate_counts_streams_of_other_hosts_and_skips_what_it_cannot_read(
        web, tmp_path):
    # What /events/rate takes from the registry of streams: a stream of another host
    # that began just now counts whole; documents that are not what a committer
    # writes (another program's, a damaged one) are left out, not a failed request.
    import socket

    from zarkov.streams import COLLECTION
    client, _, db = web
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    mine = str(tmp_path / "journal" / "0")
    db[COLLECTION].insert_many([
        {"_id": "00000000000000a1", "collection": "event", "stored": 40, "host": "elsewhere",
         "pid": 1, "journal": "/var/zarkov/journal/0", "started": now, "updated": now},
        # this host's own, under its journal: its stats file counts it
        {"_id": "00000000000000a2", "collection": "event", "stored": 1000,
         "host": socket.gethostname(), "pid": 2, "journal": mine, "started": now,
         "updated": now},
        {"_id": "00000000000000a3", "stored": "many", "updated": now, "started": now},
        {"_id": "00000000000000a4", "stored": 7, "updated": "yesterday"},
        {"_id": "00000000000000a5", "stored": 9, "journal": 5, "host": None},
    ])
    report = client.get("/events/rate?minutes=1&step=5").get_json()
    assert round(sum(rate * 5 for _, rate in report["series"])) == 40
    assert report["now"] == 4.0  # 40 events over the 10 s window


def test_a_stream_idle_for_longer_than_the_history_counts_its_next_events(db, tmp_path):
    # The rate keeps 30 minutes of points; the last point of a stream stays beyond
    # that, or the first insert after a long quiet hour would count for nothing.
    import time

    from zarkov.streams import COLLECTION
    from zarkov.web.rate import KEEP, EventRate

    def at(t: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).replace(tzinfo=None)

    rate = EventRate(str(tmp_path / "journal"))
    rate.read_streams_from(db)
    now = time.time()
    began = now - KEEP - 300
    db[COLLECTION].insert_one({"_id": "00000000000000b1", "collection": "event",
                               "host": "elsewhere", "stored": 40, "started": at(began),
                               "updated": at(began)})
    rate.sample(now=began + 1)
    rate.sample(now=now - 5)  # quiet for longer than the history kept
    db[COLLECTION].update_one({"_id": "00000000000000b1"},
                              {"$set": {"stored": 100, "updated": at(now - 2)}})
    rate.sample()
    report = rate.report(seconds=60, step=5)
    assert round(sum(r * 5 for _, r in report["series"])) == 60


def test_zcmd_status_lists_the_streams_a_committer_wrote_and_leaves_out_the_rest(db):
    # A damaged registry document must not take zcmd status down (it formats
    # `stored` as a number).
    import time

    from zarkov.cli.commands.status import lines
    from zarkov.streams import COLLECTION
    from zarkov.web.overview import event_streams

    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    db[COLLECTION].insert_many([
        {"_id": "00000000000000c1", "collection": "event", "stored": 1234, "host": "h1",
         "pid": 7, "started": now, "updated": now},
        {"_id": "00000000000000c2", "collection": "event", "stored": 5, "host": "h1",
         "pid": 6, "updated": now - dt.timedelta(hours=2)},
        {"_id": "00000000000000c3", "stored": "many", "updated": now},
        {"_id": "00000000000000c4", "stored": 3, "updated": "yesterday"},
    ])
    shown, older = event_streams(db, time.time())
    assert [s["stream"] for s in shown] == ["00000000000000c1"] and older == 1
    text = lines({"ok": True, "database": {"name": "z", "ok": True}, "event_servers": [],
                  "streams": shown, "streams_older": older,
                  "router": {"ok": False, "uri": "tcp://127.0.0.1:1"}, "jobs_running": [],
                  "aggdefs": [], "problems": []})
    assert any("00000000000000c1 (event) on h1, pid 7: stored up to 1,234" in t for t in text)
    assert "stream      and 1 more with no insert for an hour or longer" in text
