"""The real-time aggregation loop of ``zcmd serve``.

Each AggDef whose ``realtime`` field is true has a runner greenlet that runs it
incrementally, with the exactly-once guarantees of :mod:`zarkov.aggregation`,
whenever it is *due*:

* at once when the event logger of this process has committed events into the
  AggDef's input collection (:mod:`zarkov.eventlog.notify`; the event servers in
  child processes report theirs to their parent) — no polling of the collection;
* and at the latest ``realtime_interval`` seconds after its last run, for events
  that other programs write.

A runner runs one run at a time: news arriving during a run makes it due again, so
everything that arrived meanwhile goes into the next run (however many commits
that was).  Runs take the positions the event logger stored, and sweep for events
without a position (written by other programs) as every run does: where no index
finds them, at most every ``sweep_interval`` seconds (:func:`zarkov.aggregation.run`).
A run that another process holds (``zcmd aggregate``, another ``serve``) is skipped
and tried again shortly.  When a run took documents, the
loop publishes ``{"$command": "agg_complete", "name": ..., "docs": n}`` (BSON) on
``publish_bind_address`` so that dashboards can refresh (a CURVE server when keys
are on: subscribers need an authorised key too).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import gevent
import gevent.event

from zarkov import aggregation, security, wire
from zarkov import model as M
from zarkov.config import Config
from zarkov.eventlog import notify
from zarkov.runtime import loops

log = logging.getLogger("zarkov.realtime")

#: Seconds before trying again an AggDef that another process was running.
BUSY_RETRY = 0.5
#: Least seconds between two readings of the AggDef list prompted by news.
LIST_EVERY = 1.0


class _Runner:
    """The runs of one AggDef: one at a time, again as soon as it is due."""

    def __init__(self, loop: "RealtimeLoop", name: str, collection: str):
        self.loop = loop
        self.name = name
        self.collection = collection
        self.due = gevent.event.Event()
        self.due.set()  # a first run when the loop starts or the AggDef appears
        self.stopping = False
        self.greenlet = loops.spawn(f"real-time runs of {name}", self._run)

    def _run(self) -> None:
        while not self.stopping:
            self.due.wait(self.loop.config.realtime_interval)
            if self.stopping:
                return
            self.due.clear()  # news from now on makes the next run due
            try:
                busy = self.loop.run_one(self.name) is _BUSY
            except Exception:  # noqa: BLE001 - run_one guards itself; a last resort
                self.loop.errors.record(f"real-time runs of {self.name}")
                busy = False
            if busy:
                gevent.spawn_later(BUSY_RETRY, self.due.set)

    def stop(self, timeout: float) -> None:
        """Start no other run; let the one going on end within ``timeout``."""
        self.stopping = True
        self.due.set()
        self.greenlet.join(timeout)
        self.greenlet.kill(timeout=5)


_BUSY = object()


class RealtimeLoop:
    """Runs the real-time AggDefs when events arrive; counts runs, documents and errors."""

    def __init__(self, config: Config):
        self.config = config
        self.runners: dict[str, _Runner] = {}
        self.counts = {"runs": 0, "docs": 0, "errors": 0, "published": 0, "news": 0}
        self.errors = loops.Errors(log)
        self._news = gevent.event.Event()
        self._stop = gevent.event.Event()
        self._loop: gevent.Greenlet | None = None
        self._unlisten: Callable[[], None] | None = None
        self._pub: Any = None  # a zmq or zmq.green PUB socket, once started

    def start(self) -> "RealtimeLoop":
        """Bind the publish socket, listen to the event logger, start the loop."""
        security.check_binds(self.config, ("publish_bind_address",))
        z = wire.zmq_module()
        self._pub = wire.context().socket(z.PUB)
        self._pub.setsockopt(z.LINGER, 1000)
        security.secure_server(self.config, self._pub, "publish")
        self._pub.bind(self.config.publish_bind_address)
        self._unlisten = notify.listen(self.committed)
        self._loop = loops.spawn("real-time aggregation loop", self._run_loop)
        log.info("real-time aggregation when events are committed, and every %g s at the "
                 "latest; completions published on %s", self.config.realtime_interval,
                 self.config.publish_bind_address)
        return self

    def committed(self, collection: str, n: int) -> None:
        """News from the event logger: ``n`` events stored in ``collection``."""
        self.counts["news"] += 1
        for runner in list(self.runners.values()):
            if runner.collection == collection:
                runner.due.set()
        self._news.set()  # an AggDef made real-time since the last listing may want them

    def realtime_defs(self) -> dict[str, str]:
        """{name: input collection} of the AggDefs marked real-time."""
        M.configure(self.config)
        return {d["name"]: d.get("object") or "event"
                for d in M.db().agg_def.find({"realtime": True}, {"name": 1, "object": 1})}

    def _run_loop(self) -> None:
        """Keep one runner per real-time AggDef: read the list every interval, and when
        news comes (at most every LIST_EVERY seconds), for an AggDef just made real-time."""
        while not self._stop.is_set():
            try:
                self._refresh()
            except Exception:
                log.exception("real-time loop: cannot list the AggDefs")
                self.counts["errors"] += 1
            listed = time.monotonic()
            self._news.clear()
            if self._news.wait(self.config.realtime_interval):
                self._stop.wait(max(0.0, listed + LIST_EVERY - time.monotonic()))

    def _refresh(self) -> None:
        defs = self.realtime_defs()
        for name in [n for n in self.runners if defs.get(n) != self.runners[n].collection]:
            runner = self.runners.pop(name)  # no longer real-time (or reads elsewhere)
            gevent.spawn(runner.stop, self.config.agg_lease_seconds)
        for name, collection in defs.items():
            if name not in self.runners:
                self.runners[name] = _Runner(self, name, collection)

    def run_one(self, name: str) -> Any:
        """One incremental run of ``name``; publishes agg_complete when it took documents."""
        try:
            result = aggregation.run(self.config, name, full=False)
        except aggregation.Busy:
            return _BUSY  # a `zcmd aggregate` of the same AggDef holds it: soon again
        except aggregation.AggregationError as e:
            self.counts["errors"] += 1
            log.error("real-time run of %s failed: %s%s", name, e,
                      f"\n{e.traceback}" if getattr(e, "traceback", None) else "")
            return None
        except Exception:
            self.counts["errors"] += 1
            log.exception("real-time run of %s failed", name)
            return None
        self.counts["runs"] += 1
        self.counts["docs"] += result.docs
        if result.docs:
            log.info("%s: %d documents in %.2f s", name, result.docs, result.seconds)
            self._pub.send(wire.encode({"$command": "agg_complete", "name": name,
                                        "docs": result.docs}))
            self.counts["published"] += 1
        return result

    def stop(self, timeout: float = 60.0) -> None:
        """Stop starting runs, let the running ones finish (within ``timeout``)."""
        self._stop.set()
        if self._unlisten is not None:
            self._unlisten()
        if self._loop is not None:
            self._loop.kill(timeout=5)
        runners = list(self.runners.values())
        gevent.joinall([gevent.spawn(r.stop, timeout) for r in runners], timeout=timeout + 10)
        if self._pub is not None:
            self._pub.close()
