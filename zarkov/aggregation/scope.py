"""The steps of one aggregation run, driven by :mod:`zarkov.aggregation`.

The driver walks a run record through its states (docs/exactly-once.md) and hands
each step to a helper here, all working with one :class:`Scope`:

* :mod:`.records` — the run records in ``agg_run``;
* :mod:`.positions` — how far the AggDef has counted each event stream, and the
  ranges of positions a run takes;
* :mod:`.marks` — for documents without a position: the run id in their ``jobs``
  (marks) and the AggDef's name in their ``aggregates`` (flags);
* :mod:`.staging` — the Task's jobs writing into staging collections;
* :mod:`.merge` — after-images with the user's reduce, and applying them (or the
  staging collections of a full run) to the targets with :mod:`zarkov.storage`.

Helpers raise :class:`StepFailed` (or let the Task's, the router's, the lease's and
the database's own exceptions through); the driver turns them into the one-line
errors of ``zcmd aggregate`` in one place.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

from pymongo.collection import Collection
from pymongo.database import Database

from zarkov import storage
from zarkov.errors import ZarkovError
from zarkov.lease import Lease

#: Prefix of the staging collections of every run: ``zstage.<run_id>.<attempt>.<n>``
#: (:mod:`.staging`); here, so that readers of the names need not import the engine.
STAGING_PREFIX = "zstage."

#: Where a run can be stopped by a test (see :func:`pause_from_env`).
PAUSE_POINTS = ("marking", "running", "staged", "applying", "flagging")

#: ``hook(point)`` is called at each of :data:`PAUSE_POINTS` as the run passes it.
Hook = Callable[[str], None]
#: ``report(phase, docs)``: progress for people.
Report = Callable[[str, int], None]


class StepFailed(ZarkovError):
    """A step that cannot be done; the message names the culprit.

    ``bad_definition``: the AggDef's Task is at fault (``zcmd aggregate`` exits 2).
    """

    def __init__(self, message: str, traceback: Optional[str] = None,
                 bad_definition: bool = False):
        super().__init__(message, traceback)
        self.bad_definition = bad_definition


def no_hook(point: str) -> None:
    """The hook of a normal run: nothing happens at pause points."""


def pause_from_env() -> Hook:
    """The hook that ``ZARKOV_TEST_PAUSE_AT=<point>`` asks for, else :func:`no_hook`.

    At that point the run prints ``zarkov-test-pause <point>`` on stderr and sleeps
    until killed: kill tests run ``zcmd aggregate`` with it and SIGKILL it there.
    """
    wanted = os.environ.get("ZARKOV_TEST_PAUSE_AT")
    if not wanted:
        return no_hook

    def pause(point: str) -> None:
        if point == wanted:
            print(f"zarkov-test-pause {point}", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)

    return pause


@dataclass
class Scope:
    """What every step of one AggDef's runs works with."""

    config: Any
    db: Database
    #: The AggDef's name.
    name: str
    #: Its input collection.
    events: Collection
    #: The AggDef's lease: held for the whole run; every write checks it first.
    lease: Lease
    report: Report
    hook: Hook = no_hook
    #: Output targets -> the path :mod:`zarkov.storage` took to write them.
    write_paths: dict = field(default_factory=dict)
    #: Every collection of the input: ``events`` first, then the rotated ones
    #: (``event.0`` …) that exist, which hold older events.
    inputs: list = field(default_factory=list)
    #: Whether runs look for documents without a position (marks): always where
    #: indexes find them; else (a scan) when asked (:func:`zarkov.aggregation.run`).
    sweep: bool = True

    @property
    def writes(self) -> storage.Writes:
        """The write strategies of the database (its server probed once)."""
        return storage.writes(self.db)


def batches(items: Iterable[Any], size: int) -> Iterator[list]:
    """``items`` in lists of at most ``size``."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
