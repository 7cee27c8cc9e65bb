"""The event logger: ZeroMQ ingest, write-ahead journal, commits to MongoDB (README,
"The event logger").

``EventLogger(config).start()`` runs it inside a gevent process and ``.stop()`` flushes
the journal; see :mod:`zarkov.eventlog.server`.  Modules: ``schema`` (what an event
is), ``journal`` (the write-ahead log), ``committer`` (journal → ``event``),
``rejects`` and ``stats`` (bad messages, counters), ``rotate``, ``perftest`` and
``zsend`` (the tools).  Nothing is imported here, so that a process can import this
package before gevent patches it.
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy: ``from zarkov.eventlog import EventLogger`` imports the server on demand.
    if name in ("EventLogger", "EventServer", "run_until_signal"):
        from zarkov.eventlog import server
        return getattr(server, name)
    raise AttributeError(name)
