"""The dashboard page and its static files, plotly.js included, all served from here.

The chart library is the ``plotly.min.js`` that plotly's Python package (a pinned
dependency, installed from PyPI) ships in ``plotly/package_data``; the page loads
it, our own ``dashboard.js`` and ``dashboard.css`` from this service and nothing from
any other host (its Content-Security-Policy says so too).
"""
from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import os
from typing import Optional

import gevent
from flask import Flask, Response, redirect, render_template, request, send_from_directory
from werkzeug.wrappers import Response as WerkzeugResponse

from zarkov.web.http import TOKEN_COOKIE, State, error

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = os.path.join(HERE, "static")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; connect-src 'self'; font-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
#: Seconds between two refreshes of the fast panels (runs, jobs, rate) and of the charts.
REFRESH_FAST = 2
REFRESH_SLOW = 10


def plotly_js() -> Optional[str]:
    """Path of the plotly.min.js that the installed plotly package ships, if any."""
    spec = importlib.util.find_spec("plotly")  # found, not imported: that would be slow
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "package_data",
                        "plotly.min.js")
    return path if os.path.exists(path) else None


def plotly_version() -> str:
    """Version of the installed plotly package (it names the URL, for caching)."""
    try:
        return importlib.metadata.version("plotly")
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def register(app: Flask, st: State) -> None:
    """Add ``/`` and ``/static/...`` to ``app``."""
    version = plotly_version()
    zipped: dict[str, bytes] = {}

    @app.get("/", endpoint="dashboard")
    def dashboard() -> "Response | WerkzeugResponse":
        if request.args.get("token"):  # a browser's first visit with the token
            resp = redirect("/", 303)
            resp.set_cookie(TOKEN_COOKIE, request.args["token"], httponly=True,
                            samesite="Strict", secure=request.is_secure, path="/")
            return resp
        html = render_template("dashboard.html", database=st.config.mongo_database,
                               plotly=f"/static/vendor/plotly-{version}.min.js",
                               fast=REFRESH_FAST, slow=REFRESH_SLOW)
        return Response(html, mimetype="text/html", headers={
            "Content-Security-Policy": CSP, "Cache-Control": "no-store"})

    @app.get("/static/<name>", endpoint="static_file")
    def static_file(name: str) -> Response:
        if name not in ("dashboard.js", "dashboard.css"):
            return error(404, f"no static file {name!r}")
        return send_from_directory(STATIC, name, max_age=60)

    @app.get("/static/vendor/plotly-<v>.min.js", endpoint="plotly")
    def plotly(v: str) -> Response:
        path = plotly_js()
        if path is None or v != version:
            return error(404, "plotly.min.js is not installed (pip install plotly)")
        # Why gzip here: 4.8 MB of JavaScript shrinks to a third; done once, kept.
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            if path not in zipped:
                with open(path, "rb") as f:
                    data = f.read()
                # In a thread: compressing takes a few hundred ms the loop must not wait.
                zipped[path] = gevent.get_hub().threadpool.apply(gzip.compress, (data, 6))
            return Response(zipped[path], mimetype="application/javascript", headers={
                "Content-Encoding": "gzip", "Vary": "Accept-Encoding",
                "Cache-Control": "public, max-age=31536000, immutable"})
        resp = send_from_directory(os.path.dirname(path), "plotly.min.js",
                                   max_age=31536000)
        resp.headers["Vary"] = "Accept-Encoding"
        return resp
