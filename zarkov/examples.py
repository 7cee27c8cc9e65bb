"""Example aggregation tasks, ready to register (``make demo`` uses the first one).

Register one from ``zcmd shell``::

    M.AggDef(name='events_per_minute', task_name='zarkov.examples.EventsPerTypePerMinute',
             realtime=True)
    session(M.AggDef).flush()
"""
from zarkov import model as M
from zarkov.task import Task


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
