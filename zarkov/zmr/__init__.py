"""The ZeroMQ map-reduce cluster: a router (gevent) and pools of worker processes.

Data flows one way: the router reads the input collections as raw BSON and cuts it
into chunks (:mod:`.reader`); workers map and combine each chunk and split the
result into partitions by key (:mod:`.compute`, :mod:`zarkov.bsonkeys`); the router
appends partitions to files under ``job_root`` (:mod:`.spill`); each partition is
reduced (and finalized) on a worker; the router writes the outputs (:mod:`.commit`).
:mod:`.dispatch` hands tasks to the worker processes that ask for them and sends
again those whose worker is gone or late; :mod:`.job` runs the phases;
:mod:`.router` owns sockets and jobs; :mod:`.pool` runs worker processes
(:mod:`.worker`); :mod:`.jobclient` is for those who submit jobs (also importable as
``zarkov.zmr.client``, its name before 0.2).
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "client":  # the old name of .jobclient
        from zarkov.zmr import jobclient
        return jobclient
    raise AttributeError(f"module 'zarkov.zmr' has no attribute {name!r}")
