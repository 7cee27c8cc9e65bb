"""The event logger: ZeroMQ ingest, write-ahead journal, commits to MongoDB (README,
"The event logger").

``EventLogger(config).start()`` runs it inside a gevent process and ``.stop()`` flushes
the journal; see :mod:`.server`.  Modules: ``server`` (sockets and processes),
``proxy`` (the public sockets with several server processes), ``child`` (one such
process), ``intake`` (the durable intake: journal, committer, counters, rejects),
``schema`` (what an event is), ``stream`` (a journal directory's lock and
positions), ``journal`` (the write-ahead log), ``committer`` (journal → ``event``),
``notify`` (news of commits), ``rejects`` and ``stats`` (bad messages, counters),
``rotate``, ``perftest`` and ``zsend`` (the tools).  Nothing is imported here, so
that a process can import this package before gevent patches it.
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy: ``from zarkov.eventlog import EventLogger`` imports the server on demand.
    if name in ("EventLogger", "EventServer"):
        from zarkov.eventlog import server
        return getattr(server, name)
    raise AttributeError(name)
