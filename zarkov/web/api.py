"""Routes of the read-only JSON API: the original's queries and the service's state.

=================  ==========================================================
``/q``             one series: ``p`` ``c`` ``b`` ``e`` (``n``), README "The web service"
``/qs``            several: ``q`` = JSON list of /q parameter objects
``/qr``            ranked top-N: ``c`` ``p`` ``f`` (JSON filter) ``s`` (sort) ``l``
``/collections``   the ``zagg.*`` collections, counts, time keys or not
``/aggdefs``       AggDefs with last run, duration, documents, error, progress
``/jobs``          the router's running and recent jobs of this database
``/events/rate``   events stored per second: ``minutes`` (1-30), ``step`` (1-60 s)
``/health``        database, router and event logger at a glance
=================  ==========================================================

A parameter the endpoint does not know is refused (400, naming it), so that a typo
is not silently ignored.
"""
from __future__ import annotations

from flask import Flask, request

from zarkov.web import status
from zarkov.web.http import State, json_response
from zarkov.web.query import ApiError, int_param

PARAMS = {
    "q": {"p", "c", "b", "e", "n"},
    "qs": {"q"},
    "qr": {"p", "c", "f", "s", "l"},
    "collections": set(),
    "aggdefs": set(),
    "jobs": {"recent"},
    "rate": {"minutes", "step"},
    "health": set(),
}


def _params(endpoint: str) -> dict:
    allowed = PARAMS[endpoint]
    for name in request.args:
        if name not in allowed:
            raise ApiError(name, "unknown parameter" + (
                f" (this endpoint takes {', '.join(sorted(allowed))})" if allowed else
                " (this endpoint takes none)"))
    return request.args


def register(app: Flask, st: State) -> None:
    """Add the API routes to ``app``."""

    @app.get("/q")
    def q():
        return json_response(st.query.series(_params("q")))

    @app.get("/qs")
    def qs():
        return json_response(st.query.many(_params("qs")))

    @app.get("/qr")
    def qr():
        return json_response(st.query.ranked(_params("qr")))

    @app.get("/collections")
    def collections():
        _params("collections")
        return json_response({"collections": st.query.collections()})

    @app.get("/aggdefs")
    def aggdefs():
        _params("aggdefs")
        return json_response({"aggdefs": status.aggdefs(st.db, st.config.lag_warning_seconds)})

    @app.get("/jobs")
    def jobs():
        recent = int_param(_params("jobs"), "recent", "", 20, 0, 200)
        return json_response(status.jobs(st.config, st.db, recent, st.runs))

    @app.get("/events/rate")
    def rate():
        params = _params("rate")
        minutes = int_param(params, "minutes", "", 5, 1, 30)
        step = int_param(params, "step", "", 5, 1, 60)
        return json_response(st.rate.report(minutes * 60 // step * step, step))

    @app.get("/health")
    def health():
        _params("health")
        body, ok = status.health(st.config, st.db, st.intake, st.rate)
        return json_response(body, 200 if ok else 503)
