"""The real-time aggregation loop of ``zcmd serve``.

Every ``realtime_interval`` seconds it runs, incrementally, each AggDef whose
``realtime`` field is true: one run at a time per AggDef, each in its own greenlet,
with the exactly-once guarantees of :mod:`zarkov.aggregation` (a run that another
process holds is skipped, not waited for).  When a run took documents, it publishes
the BSON message ``{"$command": "agg_complete", "name": ..., "docs": n}`` on
``publish_bind_address`` so that dashboards can refresh (a CURVE server when keys
are on: subscribers need an authorised key too).
"""
from __future__ import annotations

import logging
from typing import Any

import gevent
import gevent.event

from zarkov import aggregation, security, supervise, wire
from zarkov import model as M
from zarkov.config import Config

log = logging.getLogger("zarkov.realtime")


class RealtimeLoop:
    """Runs the real-time AggDefs again and again; counts runs, documents and errors."""

    def __init__(self, config: Config):
        self.config = config
        self.running: dict[str, gevent.Greenlet] = {}
        self.counts = {"runs": 0, "docs": 0, "errors": 0, "published": 0}
        self._stop = gevent.event.Event()
        self._loop: gevent.Greenlet | None = None
        self._pub = None

    def start(self) -> "RealtimeLoop":
        """Bind the publish socket and start the loop in a greenlet."""
        security.check_binds(self.config, ("publish_bind_address",))
        z = wire.zmq_module()
        self._pub = wire.context().socket(z.PUB)
        self._pub.setsockopt(z.LINGER, 1000)
        security.secure_server(self.config, self._pub, "publish")
        self._pub.bind(self.config.publish_bind_address)
        self._loop = supervise.spawn("real-time aggregation loop", self._run_loop)
        log.info("real-time aggregation every %g s; completions published on %s",
                 self.config.realtime_interval, self.config.publish_bind_address)
        return self

    def realtime_names(self) -> list[str]:
        """Names of the AggDefs marked real-time."""
        M.configure(self.config)
        return [d["name"] for d in M.db().agg_def.find({"realtime": True}, {"name": 1})]

    def _run_loop(self) -> None:
        while not self._stop.is_set():
            try:
                for name in self.realtime_names():
                    g = self.running.get(name)
                    if g is None or g.dead:
                        self.running[name] = gevent.spawn(self.run_one, name)
            except Exception:  # noqa: BLE001 - the database may be down; try again later
                log.exception("real-time loop: cannot list the AggDefs")
                self.counts["errors"] += 1
            self._stop.wait(self.config.realtime_interval)

    def run_one(self, name: str) -> Any:
        """One incremental run of ``name``; publishes agg_complete when it took documents."""
        try:
            result = aggregation.run(self.config, name, full=False)
        except aggregation.Busy:
            return None  # a `zcmd aggregate` of the same AggDef holds it; next tick
        except aggregation.AggregationError as e:
            self.counts["errors"] += 1
            log.error("real-time run of %s failed: %s%s", name, e,
                      f"\n{e.traceback}" if getattr(e, "traceback", None) else "")
            return None
        except Exception:  # noqa: BLE001 - keep serving whatever a Task does
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
        if self._loop is not None:
            self._loop.join(timeout=5)
        gevent.joinall(list(self.running.values()), timeout=timeout)
        gevent.killall([g for g in self.running.values() if not g.dead], timeout=5)
        if self._pub is not None:
            self._pub.close()
