"""The dashboard in a real browser: Debian's headless Chromium against a real zcmd serve.

What a person would notice: the page loads with no console error and nothing from
another host; a page carrying the beacon, loaded twice, gives two ``web`` events of
one session; a time-series chart draws one point per key of its range with the
stored values; an aggregation started meanwhile shows up running with its progress,
then done; the event rate goes up while events arrive.  The last test takes the
README's screenshot over the demo's data (written to $ZARKOV_SCREENSHOT when set,
e.g. docs/dashboard.png; to a temporary file otherwise).

Without /usr/bin/chromium and /usr/bin/chromedriver (``make test`` installs them as
root) these tests are skipped, saying so.
"""
from __future__ import annotations

import datetime as dt
import http.server
import os
import random
import struct
import threading
import time
import uuid

import pytest

from tests.aggtools import ENV, register
from tests.conftest import make_config
from tests.support import free_port, wait_for, write_config
from tests.webtools import browser_missing, chrome, post_json, start_serve, web_base
from zarkov import examples
from zarkov.aggregation import positions
from zarkov.client import ZarkovClient
from zarkov.eventlog.perftest import synthetic_event

MISSING = browser_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"browser tests: {MISSING}")


def one_service(procs, mongo_uri: str, mongo_client, tmp: str, name: str):
    """A zcmd serve with its web service on a database of its own:
    (base URL, config dict, config path, database)."""
    db_name = f"zt_web_{name}_{uuid.uuid4().hex[:8]}"
    cfg = make_config(tmp, mongo_uri, db_name)
    cfg["realtime_interval"] = 1
    path = write_config(os.path.join(tmp, "zarkov.yaml"), cfg)
    start_serve(procs, path, cfg, f"serve-{name}", env=ENV)
    return web_base(cfg), cfg, path, mongo_client[db_name]


@pytest.fixture(scope="module")
def service(module_procs, mongo_uri, mongo_client, tmp_path_factory):
    """(base URL, config dict, config path, database) of the module's zcmd serve."""
    base, cfg, path, db = one_service(module_procs, mongo_uri, mongo_client,
                                      str(tmp_path_factory.mktemp("web")), "main")
    yield base, cfg, path, db
    module_procs.stop_all()
    mongo_client.drop_database(db.name)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    d = chrome(str(tmp_path_factory.mktemp("chromium")))
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def open_dashboard(driver, base: str) -> None:
    driver.get(base + "/")
    wait_for(lambda: driver.find_element("id", "status").text.startswith("updated"),
             timeout=30, what="the dashboard's first refresh")


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


# -- the page -------------------------------------------------------------------------
def test_the_dashboard_loads_without_console_errors_and_only_from_its_own_service(
        service, driver):
    base, _, _, _ = service
    driver.get_log("browser")  # start from a clean log
    open_dashboard(driver, base)
    wait_for(lambda: js(driver, "return document.querySelector('#rate-chart .main-svg') !== null"),
             timeout=30, what="the event-rate chart drawn")
    assert js(driver, "return typeof Plotly") == "object"
    resources = js(driver, "return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(base + "/") for r in resources), resources
    assert any("/static/vendor/plotly-" in r for r in resources)
    assert driver.find_element("id", "problems").get_attribute("hidden") is not None
    assert console_errors(driver) == []


# -- the beacon ------------------------------------------------------------------------
class _Page(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_a_page_with_the_beacon_loaded_twice_stores_two_web_events_of_one_session(
        service, driver):
    base, _, _, db = service
    _Page.body = (f'<!doctype html><title>shop</title><img id="px" alt="" '
                  f'src="{base}/beacon.gif?page=landing&amp;campaign=spring">').encode()
    site = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Page)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    page = f"http://127.0.0.1:{site.server_address[1]}/landing.html"
    try:
        for _ in range(2):
            driver.get(page)
            wait_for(lambda: js(driver, "const i = document.getElementById('px');"
                                        "return i.complete && i.naturalWidth === 1"),
                     timeout=20, what="the beacon image loaded (a 1x1 GIF)")
    finally:
        site.shutdown()
        site.server_close()
    wait_for(lambda: db.event.count_documents({"type": "web"}) == 2, timeout=30,
             what="two web events")
    events = list(db.event.find({"type": "web"}))
    sessions = {e["context"]["session"] for e in events}
    assert len(sessions) == 1 and len(sessions.pop()) == 32
    for e in events:
        ctx = e["context"]
        assert ctx["query"] == "page=landing&campaign=spring" and ctx["path"] == "/beacon.gif"
        assert ctx["referer"].startswith(f"http://127.0.0.1:{site.server_address[1]}/")
        assert "Chrome" in ctx["user_agent"] and ctx["remote_addr"] == "127.0.0.1"
    assert console_errors(driver) == []


# -- a time series -----------------------------------------------------------------------
def test_a_time_series_chart_draws_one_point_per_key_of_the_range_with_its_values(
        service, driver):
    base, _, _, db = service
    hours = list(range(24))
    db["zagg.hourly_sales"].insert_many(
        [{"_id": f"shop:2024-05-01T{h:02d}:00", "value": {"orders": h * 3, "refunds": h % 4}}
         for h in reversed(hours)])
    open_dashboard(driver, base)
    chart = "article[data-collection='zagg.hourly_sales'] .chart"
    assert wait_for(lambda: js(driver, f"const c = document.querySelector(\"{chart}\");"
                                       "return c && c.dataset.keys"), timeout=40,
                    what="the hourly_sales chart") == "24"
    read = (f"const gd = document.querySelector(\"{chart}\");"
            "return {traces: gd.data.map(t => ({name: t.name, x: t.x.map(x => Date.parse(x + 'Z')),"
            " y: t.y})), drawn: [...gd.querySelectorAll('.scatterlayer .trace')]"
            ".map(t => t.querySelectorAll('.point').length)}")

    def expect(hs):
        xs = [int(dt.datetime(2024, 5, 1, h, tzinfo=dt.timezone.utc).timestamp()) * 1000
              for h in hs]
        return [{"name": "orders", "x": xs, "y": [h * 3 for h in hs]},
                {"name": "refunds", "x": xs, "y": [h % 4 for h in hs]}]
    shown = js(driver, read)
    assert shown["traces"] == expect(hours)
    assert shown["drawn"] == [24, 24]  # one marker per key on each line
    # Narrow the range in the page: only the keys from 05:00 to 09:00, both included.
    card = driver.find_element("css selector", "article[data-collection='zagg.hourly_sales']")
    card.find_element("name", "b").send_keys("shop:2024-05-01T05:00")
    card.find_element("name", "e").send_keys("shop:2024-05-01T09:00")
    card.find_element("tag name", "button").click()
    wait_for(lambda: js(driver, f"return document.querySelector(\"{chart}\").dataset.keys") == "5",
             timeout=20, what="the chart redrawn over 5 keys")
    shown = js(driver, read)
    assert shown["traces"] == expect(range(5, 10)) and shown["drawn"] == [5, 5]
    assert console_errors(driver) == []


# -- an aggregation while the page looks --------------------------------------------------
def test_an_aggregation_started_meanwhile_shows_its_progress_then_done(service, driver,
                                                                      module_procs):
    base, _, path, db = service
    # An input of its own: the module's event collection has events without 'foo'.
    db.slow_input.insert_many([{"foo": "abcd"[i % 4], "type": "test"} for i in range(400)])
    register(db, "slow_agg", "my.slow.SlowTask", object="slow_input")  # 20 ms per event
    open_dashboard(driver, base)
    proc = module_procs.zcmd("aggregate", path, "aggregate", "slow_agg", env=ENV)
    row = "#aggdefs tr[data-name='slow_agg']"
    seen = {}

    def running_with_progress():
        state = js(driver, f"""
            const r = document.querySelector("{row}");
            const j = [...document.querySelectorAll('#jobs tr[data-job]')]
              .find(t => t.querySelector('td.for').textContent === 'slow_agg');
            return {{agg: r && r.dataset.state, now: r && r.querySelector('td.state').textContent,
                    job: j && j.dataset.state, bar: j && j.querySelector('progress').max,
                    label: j && j.querySelector('td.progress').textContent}}""")
        if state["agg"] == "running" and state["job"] in ("map", "reduce", "commit"):
            seen.update(state)
            return True
        assert proc.poll() is None, module_procs.log("aggregate")
        return False
    wait_for(running_with_progress, timeout=120, interval=0.2,
             what="slow_agg running on the page with its job")
    assert seen["now"].startswith("running"), seen
    if seen["job"] == "map":
        assert "chunks" in seen["label"] and seen["bar"] >= 1, seen
    assert wait_for(lambda: js(driver, f"const r = document.querySelector(\"{row}\");"
                                       "return r.dataset.state === 'idle' "
                                       "&& r.querySelector('td.last').dataset.docs"),
                    timeout=120, what="slow_agg done on the page") == "400"
    # The job table refreshes on a clock of its own: poll it too.
    wait_for(lambda: ["complete", "400"] in js(
        driver, "return [...document.querySelectorAll('#jobs tr[data-job]')]"
                ".filter(t => t.querySelector('td.for').textContent === 'slow_agg')"
                ".map(t => [t.dataset.state, t.querySelector('.docs-read').textContent])"),
        timeout=30, what="slow_agg's job complete in the job table")
    assert proc.wait(timeout=60) == 0
    assert console_errors(driver) == []


# -- the event rate -----------------------------------------------------------------------
def test_the_event_rate_rises_while_events_are_sent(service, driver):
    base, cfg, _, _ = service
    open_dashboard(driver, base)
    rate = lambda: float(driver.find_element("id", "rate-now").get_attribute("data-rate"))  # noqa: E731
    wait_for(lambda: rate() == 0, timeout=40, what="a quiet event rate first")
    client = ZarkovClient(cfg["bson_uri"])
    seen = 0.0
    try:
        deadline = time.monotonic() + 30
        sent = 0
        while time.monotonic() < deadline and sent < 6000:
            for i in range(50):
                client.event("tick", {"i": sent + i})
            sent += 50
            time.sleep(0.25)
            seen = rate()
            if seen >= 20:
                break
    finally:
        client.close()
    assert seen >= 20, f"the page's rate stayed at {seen} events/s while {sent} were sent"
    bars = js(driver, "return document.getElementById('rate-chart').data[0].y")
    assert max(bars) > 0
    assert console_errors(driver) == []


# -- the README's screenshot --------------------------------------------------------------
def test_the_screenshot_over_the_demos_data(procs, mongo_uri, mongo_client, tmp_path, driver):
    base, cfg, _, db = one_service(procs, mongo_uri, mongo_client, str(tmp_path), "demo")
    try:
        for name, task in examples.DEMO_AGGDEFS.items():
            db.agg_def.insert_one({"name": name, "task_name": task, "realtime": True})
        # One run by cron instead, not run yet: its lag shows in the picture.
        db.agg_def.insert_one({"name": "events_per_day", "realtime": False,
                               "task_name": "zarkov.examples.EventsPerTypePerDay"})
        history = examples.history(500, 120, seed=7)
        for i in range(0, len(history), 100):
            assert post_json(base, history[i:i + 100]).status == 202
        client = ZarkovClient(cfg["bson_uri"])
        rng = random.Random(3)
        for seq in range(100):
            e = synthetic_event(seq, rng)
            client.event(e["type"], e["context"], extra=e["extra"])
        client.close()
        wait_for(lambda: db.event.count_documents({}) == 600 and all(
            positions.waiting(db, name) == 0 for name in examples.DEMO_AGGDEFS), timeout=400,
            interval=1, what="the demo's AggDefs to count every event")
        driver.set_window_size(1280, 1180)
        open_dashboard(driver, base)
        wait_for(lambda: js(driver,
                            "return document.querySelectorAll('#collections article').length")
                 == 3 and js(driver, "return (document.querySelector(\"article[data-collection="
                                     "'zagg.types_per_minute'] .chart\") || {dataset: {}})"
                                     ".dataset.keys") not in (None, "0"),
                 timeout=40, what="the demo's aggregates drawn")
        lag = "return document.querySelector(\"tr[data-name='%s'] td.lag\").textContent"
        assert wait_for(lambda: js(driver, lag % "events_per_day").startswith("600 · oldest"),
                        timeout=20, what="the cron AggDef's 600 waiting events on the page")
        assert js(driver, lag % "types_per_minute") == "none"
        time.sleep(1.0)  # let plotly finish its transitions before the picture
        out = os.environ.get("ZARKOV_SCREENSHOT") or str(tmp_path / "dashboard.png")
        assert driver.save_screenshot(out)
        with open(out, "rb") as f:
            head = f.read(24)
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", head[16:24])
        assert width >= 1000 and height >= 800 and os.path.getsize(out) < 600_000
        assert console_errors(driver) == []
    finally:
        procs.stop_all()  # first: its real-time loop would create the database again
        mongo_client.drop_database(db.name)

