"""The event logger's proxy: its public sockets, dealing messages to its server processes.

With ``num_event_servers`` > 1, a :class:`Proxy` per socket (BSON, JSON) binds the
public address (a CURVE server when keys are on) and deals what it receives
round-robin to the event-server processes, over ``ipc://`` in a private (0700)
temporary directory: no other local user can connect there and pull events.  It is
ZeroMQ's own proxy, in a native thread of gevent's pool (it never touches gevent).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable

import gevent
import zmq as zmq_plain

from zarkov import security
from zarkov.runtime import loops

#: Prefix of the private directories (``<tmp>/zarkov-eventlog-<pid>-…``).
PRIVATE_PREFIX = "zarkov-eventlog-"


def private_dir() -> str:
    """A new private (0700) directory for this process's ipc sockets; those that
    event loggers which died left behind are removed first."""
    remove_stale_private_dirs()
    return tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-")


class Proxy:
    """A ZeroMQ PULL → PUSH proxy in a native thread (it never touches gevent).

    ``frontend`` is the public address; ``backend`` the ipc:// address its children
    connect to.
    """

    def __init__(self, config: Any, ctx, frontend: str, backend: str, name: str,
                 socket_name: str):
        self.ctx = ctx
        self.front = ctx.socket(zmq_plain.PULL)
        self.front.setsockopt(zmq_plain.LINGER, 0)
        security.secure_server(config, self.front, socket_name)
        self.front.bind(frontend)
        self.back = ctx.socket(zmq_plain.PUSH)
        self.back.bind(backend)
        self.backend = backend
        self.control_uri = f"inproc://zarkov-eventlog-{name}"
        self.control = ctx.socket(zmq_plain.PAIR)
        self.control.bind(self.control_uri)
        self.result: Any = None  # gevent's ThreadResult, once started
        self.stopping: Callable[[], bool] = lambda: False

    def start(self, stopping: Callable[[], bool]) -> None:
        """Run the proxy in a thread of gevent's pool; its end before ``stopping()``
        is a dead loop (the process stops, see :mod:`zarkov.runtime.loops`)."""
        self.stopping = stopping
        result = self.result = gevent.get_hub().threadpool.spawn(self._run)

        def ended(result) -> None:
            if not stopping():
                loops.loop_died(f"event logger: proxy {self.control_uri}",
                                    result.exception)
        # rawlink runs in the hub: hand the report to a greenlet.
        result.rawlink(lambda done: gevent.spawn(ended, done))

    def _run(self) -> None:
        try:
            zmq_plain.proxy_steerable(self.front, self.back, None, self.control)
        except zmq_plain.ContextTerminated:
            # The process is stopping (its context terminated before our TERMINATE
            # arrived): an end, not an error worth a traceback on stderr.
            if not self.stopping():
                raise
        finally:
            self.front.close(0)
            # Why a linger: hand what is queued to the servers before they stop.
            self.back.close(2000)
            self.control.close(0)

    def terminate(self) -> None:
        """Ask the proxy to end: it stops taking messages from its public socket."""
        sock = self.ctx.socket(zmq_plain.PAIR)
        sock.connect(self.control_uri)
        sock.send(b"TERMINATE")
        sock.close(1000)

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the proxy's thread to end; whether it did."""
        if self.result is None:
            return True
        try:
            self.result.get(timeout=timeout)
        except gevent.Timeout:
            return False
        except Exception:  # noqa: BLE001 - it ended (with ETERM, say): that is all we ask
            pass
        return True


def remove_stale_private_dirs() -> None:
    """Remove the ipc directories of event loggers that died without cleaning up."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        pid = name[len(PRIVATE_PREFIX):].split("-", 1)[0]
        if not (name.startswith(PRIVATE_PREFIX) and pid.isdigit()):
            continue
        path = os.path.join(tmp, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue
