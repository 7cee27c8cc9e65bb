"""The Dask engine as the rest of Zarkov sees it: a socket that speaks the router's
protocol (README, "The map-reduce protocol").

With ``zmr.engine: dask`` a process gets, instead of a REQ socket to the router, a
REQ socket to its own **gateway**: a child process (:mod:`.gateway`) that answers
the same ``mapreduce`` / ``xmapreduce`` / ``basic`` / ``status`` requests by running
the jobs on Dask.  So :class:`zarkov.task.Task`, :mod:`zarkov.zmr.jobclient` and the
aggregation engine are the same on both engines.

Why a child process and not a Dask Client in this one: the services run under
gevent, and a Dask Client does not work in a patched process (docs/dask-engine.md
has the evidence; a test keeps it checked).  The gateway is started with the same
Python, unpatched, through :mod:`zarkov.runtime.children`'s way of handing a child
its config; it listens on an ``ipc://`` socket in a directory only this user can
enter, and exits when its parent does (its stdin closes).

This module imports neither dask nor gevent: it is safe in any process.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from zarkov.config import Config
from zarkov.errors import ConfigError, ZarkovError
from zarkov.runtime import children

#: What to install when dask or distributed is missing (one line, zcmd exits 2).
INSTALL = "the Dask engine needs dask and distributed: pip install 'zarkov[dask]'"
#: Seconds the gateway has to import Dask and bind its socket.
START_TIMEOUT = 60.0
READY = "zarkov-dask-gateway ready "
MISSING = "zarkov-dask-gateway missing "


class DaskMissing(ConfigError):
    """dask or distributed is not installed."""


class GatewayFailed(ZarkovError):
    """The gateway process could not start."""


def tls_files(config: Config) -> Optional[tuple[str, str, str]]:
    """(CA, certificate, key) of ``security.dask_tls_*``, or None when unset (the
    config's validation made sure they go together)."""
    sec = config.security
    if sec.dask_tls_ca is None or sec.dask_tls_cert is None or sec.dask_tls_key is None:
        return None
    return sec.dask_tls_ca, sec.dask_tls_cert, sec.dask_tls_key


def check(config: Config) -> None:
    """Refuse a Dask scheduler address that would send code and data in the open.

    Dask tasks carry the shipped functions (code the workers run) and the MongoDB
    URI: as with the ZeroMQ sockets (:func:`zarkov.security.check_binds`), plain
    ``tcp://`` is allowed to loopback only; beyond it TLS (``tls://`` with
    ``security.dask_tls_*``) or ``security.allow_insecure``.  ``local`` is a
    cluster on 127.0.0.1 (with TLS when the files are set).  Raises ConfigError
    (zcmd exits 2).
    """
    from zarkov.security import is_loopback

    address = config.zmr.dask_scheduler
    files = tls_files(config)
    if address == "local":
        return
    scheme = address.partition("://")[0]
    where = f"{config.source}: key 'zmr.dask_scheduler'"
    if scheme == "tls" and files is None:
        raise ConfigError(f"{where}: {address} needs security.dask_tls_ca, dask_tls_cert "
                          f"and dask_tls_key")
    if scheme == "tcp" and files is not None:
        raise ConfigError(f"{where}: the Dask TLS files are set; use tls:// instead of "
                          f"{address}")
    if scheme == "tcp" and not is_loopback(address) and not config.security.allow_insecure:
        raise ConfigError(
            f"{where}: {address} is beyond loopback without TLS (Dask tasks carry code "
            f"and the database URI); use tls:// with security.dask_tls_ca/cert/key, or "
            f"set security.allow_insecure: true")


class Gateway:
    """One gateway child process and the ``ipc://`` address it answers on."""

    def __init__(self, config: Config):
        check(config)
        self.dir = tempfile.mkdtemp(prefix="zarkov-dask-")  # mode 0700: this user only
        self.uri = f"ipc://{os.path.join(self.dir, 'gateway')}"
        env = children.child_env(**children.config_env(config),
                                 **{children.PARENT_ENV: str(os.getpid())})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zarkov.dask_engine.gateway", "--bind", self.uri,
             "--parent"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        try:
            self._ready()
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        line = b""
        fd = self.proc.stdout.fileno()
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise GatewayFailed(f"the Dask gateway did not start within "
                                    f"{START_TIMEOUT:g} s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise GatewayFailed(f"the Dask gateway exited at start (status "
                                    f"{self.proc.wait()}); see the messages above")
            line += chunk
        text = line.decode(errors="replace").strip()
        if text.startswith(MISSING):
            raise DaskMissing(INSTALL)
        if not text.startswith(READY):
            raise GatewayFailed(f"the Dask gateway said {text!r}")

    @property
    def alive(self) -> bool:
        """Whether the child still runs."""
        return self.proc.poll() is None

    def stop(self) -> None:
        """Stop the child (closing its stdin asks it to; then SIGTERM, SIGKILL)."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        for stop in (None, self.proc.terminate, self.proc.kill):
            if stop is not None:
                stop()
            try:
                self.proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(self.dir, ignore_errors=True)


_gateways: dict[str, Gateway] = {}
_idle: dict[str, list] = {}
_lock = threading.Lock()


def _key(config: Config) -> str:
    z, s = config.zmr, config.security
    return json.dumps([config.mongo_uri, z.dask_scheduler, z.dask_workers, z.reduce_count,
                       z.map_chunk_size, s.dask_tls_ca, s.dask_tls_cert, s.dask_tls_key])


def gateway(config: Config) -> Gateway:
    """This process's gateway for ``config`` (started on first use, kept)."""
    key = _key(config)
    with _lock:
        gw = _gateways.get(key)
        if gw is not None and not gw.alive:
            gw.stop()
            _idle.pop(gw.uri, None)
            gw = None
        if gw is None:
            gw = _gateways[key] = Gateway(config)
        return gw


@contextmanager
def socket(config: Config) -> Iterator[Any]:
    """A REQ socket to this process's gateway, kept for the next run (as
    :func:`zarkov.aggregation.staging.socket` keeps the router's)."""
    from zarkov import wire

    uri = gateway(config).uri
    with wire.pooled_socket(_idle.setdefault(uri, []), lambda: wire.req_socket(uri)) as sock:
        yield sock


@atexit.register
def stop_all() -> None:
    """Stop every gateway of this process (at exit)."""
    with _lock:
        for gw in _gateways.values():
            for sock in _idle.pop(gw.uri, []):
                sock.close(0)
            gw.stop()
        _gateways.clear()
