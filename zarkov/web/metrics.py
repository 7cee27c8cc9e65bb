"""``/metrics`` of the web service: the whole service as Prometheus sees it.

A scrape reads the event servers' stats files under ``journal`` (on the host that
runs them) and the web intake's counters (``server="web"``), asks the router for its
``status``, and reads every AggDef's run counters and lag from the database — the
numbers ``zcmd status`` and the dashboard show.  Web requests are counted here, by
route (the URL rule, not the path: no series per query string) and status.
"""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pymongo.errors import PyMongoError

from zarkov.eventlog.stats import read_stats
from zarkov.metrics.endpoint import registry_of
from zarkov.metrics.families import aggdef_families, event_families, router_families
from zarkov.web import status
from zarkov.web.http import State

log = logging.getLogger("zarkov.web")


class WebMetrics:
    """The web service's registry: request counts and the service's families."""

    def __init__(self, st: State):
        self.st = st
        self.registry = registry_of(self.families, "web service")
        self.requests = Counter("zarkov_web_requests", "Web requests by route and status.",
                                ["route", "status"], registry=self.registry)

    def families(self) -> list[Any]:
        """The event servers', the router's and the AggDefs' series of this scrape."""
        cfg = self.st.config
        snaps: list[dict] = list(read_stats(cfg.journal))
        if self.st.intake is not None:
            snaps.append({**self.st.intake.stats.as_dict(), "server": "web", "alive": True})
        out = event_families(snaps)
        out += router_families(status.router_status(cfg, 0, timeout=1.0))
        db_up = GaugeMetricFamily("zarkov_database_up", "1 when the database answered the "
                                  "AggDefs' query of this scrape.")
        try:
            aggdefs = status.aggdefs(self.st.db, cfg.lag_warning_seconds)
            db_up.add_metric([], 1)
        except PyMongoError as e:
            log.warning("metrics: cannot read the AggDefs: %s", e)
            aggdefs = []
            db_up.add_metric([], 0)
        return [*out, db_up, *aggdef_families(aggdefs)]


def register(app: Flask, st: State) -> None:
    """Add ``/metrics`` and the request counter to ``app``."""
    metrics = WebMetrics(st)
    app.extensions["zarkov_metrics"] = metrics

    @app.get("/metrics")
    def metrics_page() -> Response:
        return Response(generate_latest(metrics.registry), mimetype=None,
                        headers={"Content-Type": CONTENT_TYPE_LATEST,
                                 "Cache-Control": "no-store"})

    @app.after_request
    def count(resp: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.requests.labels(rule, str(resp.status_code)).inc()
        return resp
