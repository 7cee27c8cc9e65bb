"""Helpers of the web tests: plain HTTP with the standard library, a served zcmd, browsers."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import urllib.parse
from typing import Any, Optional

from tests.support import Processes, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


class Reply:
    """One HTTP reply: status, headers (lower-case names) and body."""

    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.body[:200]!r}>"


def request(base: str, method: str, path: str, body: Optional[bytes] = None,
            headers: Optional[dict] = None, timeout: float = 30.0) -> Reply:
    """One request on a fresh connection to ``base`` (``http://host:port``)."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        out = Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        out.cookies = r.headers.get_all("Set-Cookie") or []  # type: ignore[attr-defined]
        return out
    finally:
        conn.close()


def get(base: str, path: str, **params: Any) -> Reply:
    """GET ``path`` with query ``params``."""
    query = urllib.parse.urlencode(params)
    return request(base, "GET", path + (f"?{query}" if query else ""))


def post_json(base: str, obj: Any, path: str = "/events", headers: Optional[dict] = None) -> Reply:
    """POST ``obj`` as JSON."""
    return request(base, "POST", path, json.dumps(obj).encode(),
                   {"Content-Type": "application/json", **(headers or {})})


def web_base(cfg: dict) -> str:
    """``http://127.0.0.1:<web_port>`` of a test config."""
    return f"http://127.0.0.1:{cfg['web_port']}"


def start_serve(procs: Processes, path: str, cfg: dict, name: str = "serve", *args: str,
                env: Optional[dict] = None):
    """Start ``zcmd serve`` and return once its web service answers /health."""
    p = procs.zcmd(name, path, "serve", *args, env=env)
    base = web_base(cfg)
    wait_for(lambda: p.poll() is not None or get(base, "/health").status == 200, timeout=60,
             what="the web service of zcmd serve")
    assert p.poll() is None, procs.log(name)[-3000:]
    return p


def browser_missing() -> Optional[str]:
    """Why the browser tests cannot run here, or None when they can."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            how = ("make test installs the Debian packages chromium and chromium-driver "
                   "when run as root" if os.geteuid() != 0 else
                   "run 'make browser' (apt-get install chromium chromium-driver)")
            return f"{path} is not installed ({how})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install -e '.[test]')"
    return None


def chrome(tmp_dir: str, width: int = 1280, height: int = 1000):
    """A headless Chromium driven through Debian's chromedriver (quit it when done)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = os.path.join(tmp_dir, "chromium-profile")
    shutil.rmtree(profile, ignore_errors=True)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=os.path.join(tmp_dir, "chromedriver.log"))
    return webdriver.Chrome(service=service, options=opts)
