"""The one way a Zarkov process runs.

Every process — a ``zcmd`` command, the router, a worker, an event server and its
children, the web service — starts through this layer:

* :func:`setup_logging` (:mod:`.logs`): one format, the level and file of the config
  (``verbose``, ``log_file``), set up once;
* :func:`on_stop_signals` (:mod:`.signals`): SIGTERM and SIGINT, under gevent or not;
* :mod:`.loops`: the loops that outlive bad input, and a process that stops when one
  dies all the same (exit status 70, so that its supervisor starts it again);
* :mod:`.children`: one child supervisor, one restart policy, one way of handing the
  config to a child;
* :func:`run`: long-running components — anything with ``start()`` and
  ``stop() -> bool | None`` (each with the time limit of its own) — started in
  order, stopped in reverse order on a stop signal or when a loop dies.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Protocol, Sequence

from zarkov.errors import EXIT_BUSY, EXIT_OK, ZarkovError
from zarkov.runtime import loops
from zarkov.runtime.logs import setup_logging
from zarkov.runtime.signals import on_stop_signals

__all__ = ["Component", "StartError", "run", "request_stop", "setup_logging",
           "on_stop_signals"]

log = logging.getLogger("zarkov.runtime")


class Component(Protocol):
    """A long-running part of a process."""

    def start(self) -> Any:
        """Bind, connect and start the part's loops; return at once."""

    def stop(self) -> Optional[bool]:
        """Stop (within a time limit of its own); False when work was left behind
        (events still journaled, say)."""


class StartError(ZarkovError):
    """A component could not start (a socket that cannot be bound, say)."""


def _event() -> Any:
    try:
        from gevent import monkey
        if monkey.is_module_patched("threading"):
            import gevent.event
            return gevent.event.Event()
    except ImportError:  # pragma: no cover - gevent is a dependency
        pass
    import threading
    return threading.Event()


#: The stop event of the running :func:`run` (None outside one).
_stop: Any = None


def request_stop() -> None:
    """Ask the process to stop as SIGTERM would (a ``terminate`` request, say)."""
    if _stop is not None:
        _stop.set()


def run(parts: Sequence[Callable[[], Component]], name: str = "zarkov") -> int:
    """Make and start each component in order, wait for SIGTERM or SIGINT (or a loop's
    death), then stop them in reverse order; return the exit status.

    ``name`` names the process in the log.  ``parts`` are factories, so that a
    component that cannot even be made stops the ones already started as one that
    cannot start does: then the error is raised (a
    :class:`ZarkovError` as it is — a bind beyond loopback is a ConfigError, exit 2 —,
    anything else as a :class:`StartError`).  The status is 0, 3 when a component
    left work behind, 70 when a loop died.
    """
    global _stop
    stop = _stop = _event()
    on_stop_signals(stop.set)
    loops.on_death(stop.set)
    started: list[Component] = []
    try:
        for make in parts:
            part = make()
            part.start()
            started.append(part)
    except BaseException as e:
        _stop_all(started)
        if isinstance(e, (ZarkovError, KeyboardInterrupt, SystemExit)):
            raise
        raise StartError(f"cannot start: {type(e).__name__}: {e}") from e
    log.info("%s: running (%s); stop with Ctrl-C or SIGTERM", name,
             ", ".join(type(p).__name__ for p in started))
    while not stop.wait(1.0):
        pass
    log.info("%s: stopping", name)
    ok = _stop_all(started)
    return loops.exit_status(EXIT_OK if ok else EXIT_BUSY)


def _stop_all(parts: list[Component]) -> bool:
    """Stop ``parts`` in reverse order; False when one left work behind or failed."""
    ok = True
    for part in reversed(parts):
        try:
            ok = part.stop() is not False and ok
        except Exception:
            log.exception("error while stopping %s", type(part).__name__)
            ok = False
    return ok
