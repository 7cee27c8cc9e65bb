"""Example aggregation tasks, ready to register, and made-up events to feed them.

``make demo`` registers :data:`DEMO_AGGDEFS`.  Register one from ``zcmd shell``::

    M.AggDef(name='events_per_minute', task_name='zarkov.examples.EventsPerTypePerMinute',
             realtime=True)
    session(M.AggDef).flush()

Their outputs show the two shapes the dashboard knows: keys that end in a time
(``zagg.types_per_minute``: ``"2011-07-22T10:05"`` → ``{login: 3, view: 8}``), drawn
as a time series, and other keys (``zagg.events_per_project``), drawn as a ranking.
"""
import math
import random
import time

from zarkov import model as M
from zarkov.eventlog.perftest import synthetic_event
from zarkov.task import Task

#: name -> task_name of the AggDefs ``make demo`` registers (all real-time).
DEMO_AGGDEFS = {
    "events_per_minute": "zarkov.examples.EventsPerTypePerMinute",
    "types_per_minute": "zarkov.examples.TypesPerMinute",
    "events_per_project": "zarkov.examples.EventsPerProject",
}


class EventsPerTypePerMinute(Task):
    """Counts events per (type, minute) into ``zagg.events_per_minute``."""

    def _start_jobs(self, socket, full):
        db = M.doc_session.db
        self.start_mr(socket, db.zagg.events_per_minute, full,
                      map=map_type_minute, reduce=reduce_sum)


class EventsPerTypePerDay(Task):
    """Counts events per (type, day) into ``zagg.events_per_day``."""

    def _start_jobs(self, socket, full):
        db = M.doc_session.db
        self.start_mr(socket, db.zagg.events_per_day, full,
                      map=map_type_day, reduce=reduce_sum)


def map_type_minute(objects):
    for obj in objects:
        ts = obj["timestamp"]
        yield {"type": obj.get("type"), "minute": ts.replace(second=0, microsecond=0)}, 1


def map_type_day(objects):
    for obj in objects:
        ts = obj["timestamp"]
        yield {"type": obj.get("type"),
               "day": ts.replace(hour=0, minute=0, second=0, microsecond=0)}, 1


def reduce_sum(key, values):
    return sum(values)


class TypesPerMinute(Task):
    """Events per minute, one field per type, into ``zagg.types_per_minute``:
    ``{_id: "2011-07-22T10:05", value: {login: 3, view: 8}}`` (a time series)."""

    def _start_jobs(self, socket, full):
        db = M.doc_session.db
        self.start_mr(socket, db.zagg.types_per_minute, full,
                      map=map_minute_types, reduce=reduce_sum_fields)


class EventsPerProject(Task):
    """Events per project into ``zagg.events_per_project`` (a ranking)."""

    def _start_jobs(self, socket, full):
        db = M.doc_session.db
        self.start_mr(socket, db.zagg.events_per_project, full,
                      map=map_project, reduce=reduce_sum)


def map_minute_types(objects):
    for obj in objects:
        yield obj["timestamp"].strftime("%Y-%m-%dT%H:%M"), {str(obj.get("type")): 1}


def map_project(objects):
    for obj in objects:
        project = (obj.get("context") or {}).get("project")
        if project is not None:
            yield project, 1


def reduce_sum_fields(key, values):
    out = {}
    for value in values:
        for field, n in value.items():
            out[field] = out.get(field, 0) + n
    return out


def history(n: int, minutes: int, seed: int = 1, now: float | None = None) -> list[dict]:
    """``n`` made-up JSON events spread over the last ``minutes`` minutes, busier in
    waves, with ``{"$datetime": ...}`` timestamps (for POST /events or zsend)."""
    rng = random.Random(seed)
    now = time.time() if now is None else now
    weights = [1.5 + math.sin(i / max(1, minutes) * 4 * math.pi) for i in range(minutes)]
    out = []
    for seq in range(n):
        minute = rng.choices(range(minutes), weights)[0]
        event = synthetic_event(seq, rng)
        event["timestamp"] = {"$datetime": now - (minutes - minute) * 60 + rng.random() * 60}
        out.append(event)
    return out
