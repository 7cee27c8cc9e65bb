"""The real-time loop's scheduling in one process: news of commits makes runs due,
one run at a time per AggDef, news arriving during a run coalesced into the next.
Runs are stubbed; the loop through a real zcmd serve is in test_serve.py."""
from __future__ import annotations

import collections

import gevent

from tests.support import free_port
from zarkov import config as C
from zarkov.eventlog import notify
from zarkov.realtime import RealtimeLoop


def test_news_runs_the_aggdefs_of_its_collection_one_run_at_a_time(monkeypatch):
    cfg = C.from_dict({"realtime_interval": 60,
                       "publish_bind_address": f"tcp://127.0.0.1:{free_port()}"})
    loop = RealtimeLoop(cfg)
    monkeypatch.setattr(loop, "realtime_defs", lambda: {"a": "event", "b": "other"})
    runs: list[str] = []
    running: collections.Counter = collections.Counter()
    most = collections.Counter()

    def run_one(name):
        running[name] += 1
        most[name] = max(most[name], running[name])
        runs.append(name)
        gevent.sleep(0.2)
        running[name] -= 1

    monkeypatch.setattr(loop, "run_one", run_one)
    loop.start()
    try:
        gevent.sleep(0.05)  # both run once as the loop starts
        for _ in range(20):  # 20 commits into `event` during a's runs
            notify.committed("event", 5)
            gevent.sleep(0.01)
        gevent.sleep(1.0)
    finally:
        loop.stop()
    assert runs.count("b") == 1  # nothing committed into its collection
    assert 2 <= runs.count("a") <= 3  # 20 pieces of news, coalesced
    assert most["a"] == 1  # never two runs of one AggDef at once
    notify.committed("event", 1)  # a stopped loop no longer listens
    gevent.sleep(0.3)
    assert runs.count("a") <= 3
