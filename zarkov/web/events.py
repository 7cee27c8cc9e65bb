"""Events over HTTP, for browsers and programs that cannot speak ZeroMQ.

``POST /events`` takes one JSON event or a list of them (any content type, so that
``navigator.sendBeacon`` works), validated as the JSON socket validates them
(``{"$datetime": <unix seconds>}`` for datetimes).  A request is taken whole or not
at all: 202 ``{"accepted": n}`` once every event is in the journal, else 400 naming
the first bad event and why, every bad one going to the rejects file.

``GET /beacon.gif`` answers a 1×1 transparent GIF that no cache keeps, gives the
browser a long-lived session cookie when it has none, and records an event
``{type: "web", context: {session, user_agent, remote_addr, referer, path, query}}``.
``remote_addr`` comes from ``X-Forwarded-For`` only when the peer is one of
``web_trusted_proxies``; ``query`` is the beacon's raw query string (pages put
their own data there, e.g. ``/beacon.gif?page=pricing``).
"""
from __future__ import annotations

import ipaddress
import logging
import re
import uuid
from typing import Optional

from flask import Flask, Response, request

from zarkov.eventlog.schema import Rejected, loads
from zarkov.web.http import State, error, json_response, read_body, trusted
from zarkov.web.intake import BadEvent

SESSION_COOKIE = "zarkov_session"
SESSION_AGE = 2 * 365 * 86400
_SESSION = re.compile(r"[0-9a-f]{32}")
FIELD_CHARS = 2048  # longest user agent, referer, path or query kept

# A 1x1 transparent GIF, laid out by hand: header, screen, a 2-colour table, a
# graphic control extension making colour 0 transparent, one pixel, trailer.
GIF = bytes.fromhex(
    "474946383961" "0100" "0100" "80" "00" "00"     # GIF89a, 1x1, global colour table
    "000000" "ffffff"                                # black, white
    "21f904" "01" "0000" "00" "00"                   # transparent colour 0
    "2c" "0000" "0000" "0100" "0100" "00"            # image descriptor
    "02" "02" "4401" "00"                            # LZW: one pixel of colour 0
    "3b")                                            # trailer
NO_CACHE = {"Cache-Control": "no-cache, no-store, must-revalidate, max-age=0",
            "Pragma": "no-cache", "Expires": "0"}
CORS = {"Access-Control-Allow-Origin": "*"}

log = logging.getLogger("zarkov.web.events")


def client_address(remote: Optional[str], forwarded: Optional[str], proxies: tuple) -> str:
    """The client's address: the peer, or when the peer is a trusted proxy the last
    address of X-Forwarded-For that is not one (invalid entries end the walk)."""
    addr = remote or ""
    if not forwarded or not trusted(remote, proxies):
        return addr
    for hop in reversed([h.strip() for h in forwarded.split(",")]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break
        addr = hop
        if not trusted(hop, proxies):
            break
    return addr


def _clip(text: Optional[str]) -> str:
    return (text or "")[:FIELD_CHARS]


def register(app: Flask, st: State) -> None:
    """Add the event routes to ``app``."""

    @app.route("/events", methods=["OPTIONS"], endpoint="events_preflight")
    def preflight() -> Response:
        return Response(status=204, headers={
            **CORS, "Access-Control-Allow-Methods": "POST",
            "Access-Control-Allow-Headers": "Content-Type", "Access-Control-Max-Age": "86400"})

    @app.post("/events", endpoint="events")
    def post_events() -> Response:
        body = read_body()
        intake = st.intake
        if intake is None:
            return error(503, "this process takes no events (no intake running)")
        if not body.strip():
            intake.reject(body, "empty body")
            return error(400, "body: empty; send one JSON event or a list", "body", CORS)
        try:
            obj = loads(body)
        except Rejected as e:
            intake.reject(body, str(e))
            return error(400, f"body: {e}", "body", CORS)
        items = obj if isinstance(obj, list) else [obj]
        if not items:
            intake.reject(body, "empty list")
            return error(400, "body: an empty list holds no event", "body", CORS)
        try:
            accepted = intake.accept(items, None if items is obj else body)
        except BadEvent as e:
            where = f"events[{e.index}]" if items is obj else "body"
            return error(400, f"{where}: {e.reason}", where, CORS)
        except OSError as e:
            log.error("cannot write the web intake's journal: %s", e)
            return error(503, "cannot journal the events right now; send them again", None, CORS)
        return json_response({"accepted": accepted}, 202, CORS)

    @app.get("/beacon.gif", endpoint="beacon")
    def beacon() -> Response:
        sid = request.cookies.get(SESSION_COOKIE, "")
        new = not _SESSION.fullmatch(sid)
        if new:
            sid = uuid.uuid4().hex
        event = {"type": "web", "context": {
            "session": sid, "user_agent": _clip(request.user_agent.string),
            "remote_addr": client_address(request.remote_addr,
                                          request.headers.get("X-Forwarded-For"), st.proxies),
            "referer": _clip(request.referrer), "path": _clip(request.path),
            "query": _clip(request.query_string.decode("utf-8", "replace"))}}
        status = 200
        try:
            if st.intake is None:
                raise OSError("no intake running")
            st.intake.accept([event])
        except (OSError, Rejected) as e:
            log.error("beacon not recorded: %s", e)
            status = 503
        resp = Response(GIF, status=status, mimetype="image/gif", headers=NO_CACHE)
        if new:
            secure = request.is_secure or (
                trusted(request.remote_addr, st.proxies)
                and request.headers.get("X-Forwarded-Proto", "").lower() == "https")
            # Why SameSite=None over HTTPS: a beacon is usually on another site's pages.
            resp.set_cookie(SESSION_COOKIE, sid, max_age=SESSION_AGE, path="/", httponly=True,
                            secure=secure, samesite="None" if secure else "Lax")
        return resp
