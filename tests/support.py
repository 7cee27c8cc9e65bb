"""Helpers for tests that run real Zarkov processes: ports, polling, process groups."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Callable

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZCMD = [sys.executable, os.path.join(ROOT, "scripts", "zcmd")]


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and not handed out
    before by this process.

    Why not the port the kernel picks for a bind to port 0: that one is from the
    ephemeral range, where any outgoing connection of the test's processes may take
    it before the process meant to listen on it binds (seen as "Address already in
    use").  Ports below that range are only ever taken by an explicit bind.
    """
    low, high = _ephemeral_range()
    first, last = (20000, min(low, 32000) - 1) if low > 21000 else (high + 1, 65535)
    for _ in range(200):
        port = random.randint(first, last)
        if port in _handed_out or 27000 <= port <= 27200:  # the bundled servers' ports
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port found in {first}-{last}")


def wait_for(cond: Callable[[], object], timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition"):
    """Poll ``cond`` until it returns a true value (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - keep polling, report the last one
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))


def subscriber(address: str, keys=None, timeout: float = 30.0):
    """A SUB socket subscribed to everything at ``address``, returned once its
    handshake with the publisher has succeeded: a PUB drops what it publishes before
    a subscriber has joined (ZeroMQ's slow joiner), and a fast run would announce
    itself before a socket only just connected hears it."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    if keys is not None:
        keys.apply(sub)
    monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sub.connect(address)
    try:
        if not monitor.poll(timeout * 1000):
            sub.close(0)
            raise AssertionError(f"no handshake with the publisher at {address} in {timeout} s")
        recv_monitor_message(monitor)
    finally:
        sub.disable_monitor()
        monitor.close(0)
    return sub


def children(pid: int) -> list[int]:
    """Process ids of the children of ``pid`` (a worker pool's processes), whichever of
    its threads started them."""
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return sorted(out)


def child_asleep(pid: int) -> int | None:
    """A child of ``pid`` asleep in ``time.sleep`` (Linux's wchan), or None: a worker
    process caught inside a map that sleeps, such as ``map_slow``."""
    for child in children(pid):
        try:
            with open(f"/proc/{child}/wchan") as f:
                if "nanosleep" in f.read():
                    return child
        except OSError:
            continue
    return None


def proc_env(extra: dict | None = None) -> dict:
    """The environment for child processes: the repo importable, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Processes:
    """Processes started by one test; every one is killed (with its children) at the end."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` in its own process group, output to ``<log_dir>/<name>.log``."""
        log = open(os.path.join(self.log_dir, f"{name}.log"), "ab")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                             env=proc_env(kw.pop("env", None)), cwd=kw.pop("cwd", ROOT),
                             start_new_session=True, **kw)
        log.close()
        self.procs.append((name, p))
        return p

    def zcmd(self, name: str, config_path: str, *args: str, **kw) -> subprocess.Popen:
        """Start ``zcmd -y config_path args...`` in the background."""
        return self.start(name, ZCMD + ["-y", config_path, *args], **kw)

    def log(self, name: str) -> str:
        """What the named process has written so far."""
        try:
            with open(os.path.join(self.log_dir, f"{name}.log"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def kill(self, p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process group of ``p`` and reap it."""
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

    def stop_all(self) -> None:
        """Stop everything: SIGTERM first, SIGKILL to whatever remains."""
        for _, p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # children of a process that exited may live on in its group
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if p.poll() is None:
                p.wait(timeout=10)


def run_zcmd(config_path: str | None, *args: str, timeout: float = 300, input: str | None = None,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``zcmd`` to completion and return the CompletedProcess (text output)."""
    argv = ZCMD + (["-y", config_path] if config_path else []) + list(args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=proc_env(env),
                          cwd=ROOT, input=input)


def write_config(path: str, data: dict) -> str:
    """Write a YAML config file and return its path."""
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


class Cluster:
    """A map-reduce router and a pool of worker processes, started with ``zcmd``.

    ``path`` is their config file; ``keys`` (ClientKeys) when the router uses CURVE.
    ``start()`` returns once the router answers and
    ``workers`` worker processes report to it.  Either part may be killed and started again;
    ``router``/``workers`` are the current Popens, logged as ``router``/``worker``
    (then ``router2``, ``worker2``, … for later starts).
    """

    def __init__(self, procs: Processes, path: str, workers: int = 2, keys=None):
        self.procs, self.path, self.n_workers, self.keys = procs, path, workers, keys
        with open(path) as f:
            self.uri = yaml.safe_load(f)["zmr"]["req_uri"]
        self.router: subprocess.Popen | None = None
        self.workers: subprocess.Popen | None = None
        self._starts = {"router": 0, "worker": 0}

    def _name(self, part: str) -> str:
        """Log name of the next start of ``part``: ``router``, ``router2``, …"""
        self._starts[part] += 1
        return part + (str(self._starts[part]) if self._starts[part] > 1 else "")

    def status(self, timeout: float = 5.0) -> dict:
        """The router's reply to ``status`` without a job id (workers, jobs counts)."""
        return router_status(self.uri, timeout, self.keys)

    def start_router(self) -> None:
        """Start ``zcmd zmr-router``; return once it answers ``echo``."""
        from zarkov import wire
        self.router = self.procs.zcmd(self._name("router"), self.path, "zmr-router")
        wait_for(lambda: wire.request(self.uri, {"$command": "echo"}, 1.0, self.keys),
                 timeout=30, what="the router to answer echo")

    def start_workers(self) -> None:
        """Start ``zcmd zmr-worker``; return once the router hears from its processes."""
        self.workers = self.procs.zcmd(self._name("worker"), self.path, "zmr-worker")
        wait_for(lambda: self.status(1.0).get("workers", 0) >= self.n_workers, timeout=30,
                 what=f"{self.n_workers} worker processes to report to the router")

    def start(self) -> "Cluster":
        """Start the router, then the workers."""
        self.start_router()
        self.start_workers()
        return self

    def jobs_known(self) -> int:
        """Jobs the router has been given and still remembers (finished ones: 1 h)."""
        return self.status()["jobs_known"]

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until no job runs in the router (e.g. one of a killed ``zcmd aggregate``)."""
        wait_router_idle(self.uri, timeout, self.keys)


def router_status(uri: str, timeout: float = 5.0, keys=None) -> dict:
    """The reply of the router at ``uri`` to ``status`` without a job id."""
    from zarkov import wire
    return wire.request(uri, {"$command": "status"}, timeout, keys)


def wait_router_idle(uri: str, timeout: float = 60, keys=None) -> None:
    """Wait until the router at ``uri`` runs no job."""
    wait_for(lambda: router_status(uri, 1.0, keys)["jobs_running"] == 0, timeout=timeout,
             what="the router's jobs to end")


# -- the server under test -------------------------------------------------------------
class TestServer:
    """The MongoDB-wire server a test session runs against.

    ``kind`` is ``ferretdb`` or ``java`` (the bundled servers) or ``mongodb`` (any
    other, named by ZARKOV_TEST_MONGO_URI); ``caps`` its :class:`zarkov.storage.Capabilities`.
    """

    __test__ = False  # not a test class, despite the name

    KINDS = {"FerretDB": "ferretdb", "mongo-java-server": "java", "MongoDB": "mongodb"}

    def __init__(self, uri: str, how: str):
        import pymongo

        from zarkov import storage
        self.uri, self.how = uri, how
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10000)
        try:
            probe_db = "zt_probe_" + uuid.uuid4().hex[:8]
            self.caps = storage.capabilities(client, probe_db)
            client.drop_database(probe_db)
        finally:
            client.close()
        self.kind = self.KINDS[self.caps.server]
        self.label = self.caps.label
        #: One word for the summary line: ``FerretDB-1.24.2``.
        self.word = f"{self.caps.server}-{self.caps.version}"


_server: "TestServer | None" = None


def test_server() -> TestServer:
    """The session's server, started by ``scripts/dev-db`` on first use if need be."""
    global _server
    if _server is None:
        uri = os.environ.get("ZARKOV_TEST_MONGO_URI")
        if uri:
            _server = TestServer(uri, "ZARKOV_TEST_MONGO_URI")
        else:
            import pytest
            kind = os.environ.get("ZARKOV_TEST_SERVER", "ferretdb")
            out = subprocess.run([os.path.join(ROOT, "scripts", "dev-db"), "start", kind],
                                 capture_output=True, text=True, timeout=900)
            if out.returncode != 0:
                pytest.exit(f"cannot start the bundled {kind} server: {out.stderr.strip()}", 3)
            _server = TestServer(out.stdout.strip().splitlines()[-1],
                                 f"ZARKOV_TEST_SERVER={kind}, scripts/dev-db")
    return _server


test_server.__test__ = False  # type: ignore[attr-defined]


def test_server_if_known() -> "TestServer | None":
    """The session's server if something already asked for it, else None."""
    return _server


test_server_if_known.__test__ = False  # type: ignore[attr-defined]


class PrivateServer:
    """A bundled server of one kind that a test starts, kills and starts again.

    It listens on a port of its own and keeps its data in ``data_dir`` (FerretDB's
    SQLite files; the java server's H2 file), so they survive a SIGKILL.  Every
    start is a process of the test's :class:`Processes`, stopped at the end.
    """

    BINARIES = {"ferretdb": "ferretdb", "java": "java-server"}

    def __init__(self, procs: Processes, kind: str, data_dir: str):
        self.procs, self.kind, self.data_dir = procs, kind, data_dir
        self.binary = os.path.join(ROOT, "var", "bin", self.BINARIES[kind])
        self.port = free_port()
        self.uri = f"mongodb://127.0.0.1:{self.port}/"
        self.proc: subprocess.Popen | None = None
        self._starts = 0
        os.makedirs(data_dir, exist_ok=True)

    def start(self) -> "PrivateServer":
        """Start it; return once it answers ``ping``."""
        self._starts += 1
        name = f"{self.kind}-db{self._starts}"
        self.proc = self.procs.start(name, [self.binary, "-listen", f"127.0.0.1:{self.port}",
                                            "-data", self.data_dir])
        wait_for(lambda: self.proc.poll() is None and self.ping(), timeout=60,
                 what=f"the private {self.kind} server (log: {self.procs.log(name)[-300:]!r})")
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL: no goodbye) and reap it."""
        self.procs.kill(self.proc, sig)

    def ping(self) -> bool:
        """Whether it answers ``ping`` now."""
        import pymongo
        client = pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=300)
        try:
            return bool(client.admin.command("ping"))
        except pymongo.errors.PyMongoError:
            return False
        finally:
            client.close()


#: The write paths of zarkov.storage that each kind of server must take.  Real MongoDB
#: and mongo-java-server take MongoDB's; FerretDB 1.24 the fallbacks.
MONGODB_PATHS = {"replace": "renamed over", "overwrite": "replace-upserts", "move": "renamed"}
EXPECTED_PATHS = {
    "mongodb": MONGODB_PATHS,
    "java": MONGODB_PATHS,
    "ferretdb": {"replace": "replaced in place", "overwrite": "delete+insert",
                 "move": "moved documents"},
}
#: (test, what, path) of every path assertion made in the session, for its summary.
PATHS_CHECKED: list[tuple[str, str, str]] = []
