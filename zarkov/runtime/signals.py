"""Stop cleanly on SIGTERM and SIGINT, under gevent or not."""
from __future__ import annotations

import signal
from typing import Callable


def on_stop_signals(callback: Callable[[], None]) -> None:
    """Call ``callback`` (once per signal) on SIGTERM and SIGINT."""
    try:
        from gevent import monkey
        patched = monkey.is_module_patched("socket")
    except ImportError:  # pragma: no cover - gevent is a dependency
        patched = False
    for sig in (signal.SIGTERM, signal.SIGINT):
        if patched:
            # A plain handler may run only when the hub next wakes up; gevent's
            # runs the callback in a greenlet as soon as the signal arrives.
            import gevent
            gevent.signal_handler(sig, callback)
        else:
            signal.signal(sig, lambda signum, frame: callback())
