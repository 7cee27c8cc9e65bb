"""The web service's WSGI application: routes, access control, errors as JSON.

:func:`create_app` builds a Flask app over one configured database.  Routes live by
theme: :mod:`.api` (the read-only query API and status), :mod:`.events` (events over
HTTP) and :mod:`.dashboard` (the page and its static files).

Access: the query API, ``/metrics`` and the dashboard require ``Authorization: Bearer <web_token>``
(or the cookie that ``/?token=<web_token>`` sets for a browser) whenever
``web_token`` is set, and it must be set to listen beyond loopback.  Without a
token they answer only requests addressed to a loopback host name, so that a web
page elsewhere cannot read them through DNS rebinding.  The event endpoints and
``/health`` are open: they only feed the event logger or say whether it is up.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
from typing import Any, Optional

import pymongo
from flask import Flask, Response, request
from pymongo.errors import PyMongoError
from werkzeug.exceptions import HTTPException

from zarkov.config import Config
from zarkov.security import host_name, http_bind_problem, is_loopback_host
from zarkov.web import api, dashboard, events, metrics
from zarkov.web.http import (
    MAX_BODY,
    TOKEN_COOKIE,
    State,
    error,
    json_response,
    trusted,
)
from zarkov.web.query import ApiError, QueryApi
from zarkov.web.rate import EventRate
from zarkov.web.status import RunNames

#: Endpoints anyone may call (the others need the token when one is set).
OPEN = frozenset(("events", "events_preflight", "beacon", "health"))

log = logging.getLogger("zarkov.web")


def bind_problem(config: Config) -> Optional[str]:
    """Why the web service may not start with this config (one line), or None."""
    return http_bind_problem(config, config.web_bind, "web_bind")


def create_app(config: Config, intake: Any = None, rate: Any = None,
               client: Optional[pymongo.MongoClient] = None) -> Flask:
    """The WSGI app over ``config``'s database; ``intake``/``rate`` as the server made them."""

    app = Flask("zarkov.web", static_folder=None)
    app.json.sort_keys = False  # type: ignore[attr-defined]  # the default provider has it
    client = client or pymongo.MongoClient(
        config.mongo_uri, serverSelectionTimeoutMS=3000, connectTimeoutMS=3000,
        socketTimeoutMS=60000, tz_aware=False)
    rate = rate or EventRate(config.journal)
    rate.read_streams_from(client[config.mongo_database])
    st = State(config, client, QueryApi(client[config.mongo_database]), intake, rate,
               tuple(ipaddress.ip_network(p, strict=False) for p in config.web_trusted_proxies),
               RunNames())
    app.extensions["zarkov"] = st

    @app.before_request
    def guard() -> Optional[Response]:
        if (request.content_length or 0) > MAX_BODY:
            return error(413, f"request body over {MAX_BODY} bytes", "body")
        if request.endpoint in OPEN:
            return None
        token = config.web_token
        if token:
            return _check_token(token)
        if not is_loopback_host(host_name(request.host)) and not trusted(request.remote_addr,
                                                                    st.proxies):
            return error(403, f"host {request.host!r}: without web_token only loopback "
                         "host names are served", "Host")
        return None

    @app.after_request
    def headers(resp: Response) -> Response:
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        return resp

    @app.errorhandler(ApiError)
    def api_error(e: ApiError) -> Response:
        return json_response(e.body(), e.status)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> Response:
        if e.code == 413:
            return error(413, f"request body over {MAX_BODY} bytes", "body")
        return error(e.code or 500, f"{e.name}: {e.description}")

    @app.errorhandler(PyMongoError)
    def db_error(e: PyMongoError) -> Response:
        log.warning("database error on %s: %s", request.path, e)
        return error(503, f"database unavailable or refused the query: {str(e)[:300]}")

    @app.errorhandler(Exception)
    def internal(e: Exception) -> Response:
        log.exception("error on %s %s", request.method, request.path)
        return error(500, f"internal error: {type(e).__name__}")

    api.register(app, st)
    events.register(app, st)
    dashboard.register(app, st)
    metrics.register(app, st)
    return app


def _check_token(token: str) -> Optional[Response]:
    given = None
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    elif request.cookies.get(TOKEN_COOKIE):
        given = request.cookies[TOKEN_COOKIE]
    elif request.endpoint == "dashboard" and request.args.get("token"):
        given = request.args["token"]
    if given is not None and hmac.compare_digest(given.encode(), token.encode()):
        return None
    return error(401, "a bearer token is required (Authorization: Bearer <web_token>; "
                 "a browser can open /?token=<web_token> once)", "Authorization",
                 {"WWW-Authenticate": 'Bearer realm="zarkov"'})
