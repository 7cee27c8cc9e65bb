"""The web service's WSGI application: routes, access control, errors as JSON.

:func:`create_app` builds a Flask app over one configured database.  Routes live by
theme: :mod:`.api` (the read-only query API and status), :mod:`.events` (events over
HTTP) and :mod:`.dashboard` (the page and its static files).

Access: the query API and the dashboard require ``Authorization: Bearer <web_token>``
(or the cookie that ``/?token=<web_token>`` sets for a browser) whenever
``web_token`` is set, and it must be set to listen beyond loopback.  Without a
token they answer only requests addressed to a loopback host name, so that a web
page elsewhere cannot read them through DNS rebinding.  The event endpoints and
``/health`` are open: they only feed the event logger or say whether it is up.
"""
from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import logging
from typing import Any, Optional

import pymongo
from flask import Flask, Response, request
from pymongo.errors import PyMongoError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from zarkov.config import Config
from zarkov.web import jsonout
from zarkov.web.query import ApiError, QueryApi
from zarkov.web.rate import EventRate
from zarkov.web.status import RunNames

MAX_BODY = 64 * 1024
TOKEN_COOKIE = "zarkov_token"
#: Endpoints anyone may call (the others need the token when one is set).
OPEN = frozenset(("events", "events_preflight", "beacon", "health"))

log = logging.getLogger("zarkov.web")


@dataclasses.dataclass
class State:
    """What the routes share: config, database, query API, intake and event rate."""

    config: Config
    client: pymongo.MongoClient
    query: QueryApi
    intake: Any = None
    rate: Any = None
    proxies: tuple = ()
    runs: Any = None

    @property
    def db(self):
        """The configured database."""
        return self.query.db


def json_response(body: Any, status: int = 200, headers: Optional[dict] = None) -> Response:
    """A JSON reply that no cache keeps."""
    resp = Response(jsonout.dumps(body), status=status, mimetype="application/json")
    resp.headers["Cache-Control"] = "no-store"
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def error(status: int, message: str, parameter: Optional[str] = None,
          headers: Optional[dict] = None) -> Response:
    """A JSON error reply ``{error, parameter}``."""
    body = {"error": message}
    if parameter:
        body["parameter"] = parameter
    return json_response(body, status, headers)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is loopback."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_problem(config: Config) -> Optional[str]:
    """Why the web service may not start with this config (one line), or None."""
    if not is_loopback(config.web_bind) and not config.web_token:
        return (f"{config.source}: key 'web_token': required when web_bind "
                f"({config.web_bind}) is beyond loopback; set a token of 16+ characters "
                "or bind 127.0.0.1")
    return None


def host_name(host: str) -> str:
    """The name or address of a Host header, without its port."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0]


def trusted(address: Optional[str], proxies: tuple) -> bool:
    """Whether ``address`` belongs to one of the trusted proxy networks."""
    if not address or not proxies:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def read_body() -> bytes:
    """The request body, at most MAX_BODY bytes; RequestEntityTooLarge (413) past that.

    Why by hand: Werkzeug cuts a chunked body at its maximum length without saying so.
    """
    data = request.stream.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise RequestEntityTooLarge()
    return data


def create_app(config: Config, intake: Any = None, rate: Any = None,
               client: Optional[pymongo.MongoClient] = None) -> Flask:
    """The WSGI app over ``config``'s database; ``intake``/``rate`` as the server made them."""
    from zarkov.web import api, dashboard, events  # noqa: PLC0415 - they import this module

    app = Flask("zarkov.web", static_folder=None)
    app.json.sort_keys = False
    client = client or pymongo.MongoClient(
        config.mongo_uri, serverSelectionTimeoutMS=3000, connectTimeoutMS=3000,
        socketTimeoutMS=60000, tz_aware=False)
    st = State(config, client, QueryApi(client[config.mongo_database]), intake,
               rate or EventRate(config.journal),
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
        if not is_loopback(host_name(request.host)) and not trusted(request.remote_addr,
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
