"""What the web service's routes share: their state, JSON replies and errors, and the
checks of where a request comes from.  The routes themselves are in :mod:`.api`,
:mod:`.events` and :mod:`.dashboard`; :mod:`.app` puts them together.
"""
from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any, Optional

import pymongo
from flask import Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from zarkov.config import Config
from zarkov.web import jsonout
from zarkov.web.query import QueryApi

MAX_BODY = 64 * 1024
TOKEN_COOKIE = "zarkov_token"
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
