"""Zarkov's data model in MongoDB, through Ming: the ``event`` and ``agg_def`` collections.

``doc_session`` is the Ming document session (its ``.db`` is the configured pymongo
Database) and ``orm_session`` the thread-local ODM session on top of it.  Every
command that touches the model calls :func:`configure` first; after that the
registration of README "Using it" works as written::

    from ming.orm import session
    from zarkov import model as M
    M.AggDef(name='my_agg_def', task_name='my.tasks.MyTask')
    session(M.AggDef).flush()

The bookkeeping collections of aggregation runs (``agg_lease``, ``agg_run``) belong to
:mod:`zarkov.aggregation` and :mod:`zarkov.lease`, which use pymongo directly: their
writes are conditional updates that an ORM unit of work cannot express.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from ming import Field, Index, Session, collection
from ming import schema as S
from ming.datastore import DataStore, create_engine
from ming.odm import ThreadLocalODMSession

EPOCH = datetime(1970, 1, 1)

#: The Ming document session; ``doc_session.db`` is the configured pymongo Database.
doc_session = Session()
#: The ODM (ORM) session used by mapped classes such as :class:`AggDef`.
orm_session = ThreadLocalODMSession(doc_session=doc_session)

# Events: the schema only names the fields Zarkov itself relies on.  Events carry
# whatever else their senders put in them and other programs may write to the
# collection too, so ``_id`` may be of any type and code reads events through
# pymongo (``doc_session.db.event``) or ``event.m.find(..., validate=False)``: Ming's
# validation would reject their extra fields.  There is no mapped class for the
# same reason.  (The type: ignores: Ming's stubs know only its declarative Field forms.)
event = collection(  # type: ignore[misc]
    "event", doc_session,
    # The event logger's events: their position (zarkov.positions); others: any id.
    Field("_id", S.Anything()),
    # The position's number in its stream: only on events the event logger stored.
    Field("_seq", S.Anything()),
    Field("timestamp", datetime),
    Field("type", str),
    Field("context", S.Anything()),
    Field("extra", S.Anything()),
    # Events without a position only: names of the AggDefs that have counted it ...
    Field("aggregates", [str]),
    # ... and lock ids of the aggregation runs that have selected it.
    Field("jobs", [str]),
    Index("aggregates"),
    Index("jobs"),
    Index("_seq", "aggregates"))

# Aggregations defined over (by default) the 'event' collection (README, "Using it").
agg_def = collection(  # type: ignore[misc]
    "agg_def", doc_session,
    Field("_id", S.ObjectId()),
    # Name for the aggregation
    Field("name", str),
    # Input collection to aggregate
    Field("object", str, if_missing="event"),
    # Dotted path of the Task subclass
    Field("task_name", str),
    # Start time of the last successful run
    Field("last_run", datetime, if_missing=EPOCH),
    # Whether `zcmd serve`'s real-time loop runs it
    Field("realtime", bool, if_missing=False),
    Index("name", unique=True))


class AggDef:
    """An aggregation definition: a name, an input collection and a Task's dotted path."""

    # What Ming's mapper gives instances and the class (for type checkers only).
    query: Any
    name: str
    object: str
    task_name: str
    last_run: datetime
    realtime: bool

    @classmethod
    def by_name(cls, name: str) -> Optional["AggDef"]:
        """The AggDef called ``name`` as stored now, or None.

        Refreshed from the database even when the session already holds it, so a
        long-running process (``zcmd serve``) sees edits made by others.
        """
        return cls.query.find({"name": name}).options(refresh=True).first()

    @classmethod
    def names(cls) -> list[str]:
        """Names of every AggDef, sorted."""
        return sorted(a.name for a in cls.query.find())

    def __repr__(self) -> str:
        return f"<AggDef {self.name!r} task={self.task_name!r} object={self.object!r}>"


orm_session.mapper(AggDef, agg_def)

# (uri, database) currently bound; configure() is cheap when nothing changes, so the
# real-time loop can call it before every run.
_bound: Optional[tuple[str, str]] = None
# (uri, database) whose agg_def index this process has made sure of.
_indexed: set = set()


def configure(config: Any, ensure_indexes: bool = True) -> None:
    """Bind the sessions to ``config.mongo_uri`` / ``config.mongo_database``.

    ``config`` is a :class:`zarkov.config.Config` (anything with those two
    attributes).  With ``ensure_indexes`` the unique index on ``agg_def.name`` is
    created, so that registering a name twice fails instead of silently duplicating.
    """
    global _bound
    key = (config.mongo_uri, config.mongo_database)
    if _bound != key:
        if config.mongo_uri.startswith("mim:"):
            # In-memory Mongo, for pure unit tests of model logic.
            engine = create_engine("mim://")
        else:
            engine = create_engine(config.mongo_uri, tz_aware=False)
        doc_session.bind = DataStore(engine, config.mongo_database)
        orm_session.close()  # forget objects loaded from another database
        _bound = key
    if ensure_indexes and key not in _indexed:
        doc_session.db[agg_def.m.collection_name].create_index("name", unique=True)
        _indexed.add(key)


def db():
    """The configured pymongo Database (``doc_session.db``)."""
    return doc_session.db
