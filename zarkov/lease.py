"""Leases: one holder at a time for a named resource, safe without transactions.

A lease is one document ``{_id: key, token, host, pid, expires}`` in a collection.
It is taken by INSERTING that document: an insert that collides on ``_id`` fails
atomically on MongoDB and on FerretDB alike, whereas "update if unset" is not atomic
on FerretDB (it reads, modifies in Go, then writes).  A holder that died leaves its
document behind; it is *stale* when

* it was taken on this host and its process no longer exists, or
* its ``expires`` time has passed (the holder stopped renewing: dead, hung, or on a
  host we cannot see).

A stale lease is removed by deleting ``{_id, token: <its token>}`` — if two
processes find the same stale lease, only one delete matches and then only one
insert succeeds.  The holder renews ``expires`` with an update filtered on its own
token; when that matches nothing, the lease was lost and the holder must stop
writing at once, without cleaning anything up (the new holder owns the work).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError, PyMongoError

from zarkov.errors import Busy, ZarkovError

log = logging.getLogger(__name__)

HOST = socket.gethostname()


class LeaseBusy(Busy):
    """The lease is held by a live holder."""

    def __init__(self, key: Any, holder: dict):
        self.key = key
        self.holder = holder
        super().__init__(f"{key!r} is held by pid {holder.get('pid')} on "
                         f"{holder.get('host')} since {holder.get('taken')}")


class LeaseLost(ZarkovError):
    """Our lease was taken over (we stalled longer than its duration) or removed."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    return True


def utcnow() -> datetime:
    """Naive UTC at millisecond precision: what a round trip through BSON gives back."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def utc_seconds(when: datetime) -> float:
    """Seconds since the epoch of a time from the database (naive: UTC, as pymongo
    hands them back by default)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def is_stale(doc: dict, now: Optional[datetime] = None) -> bool:
    """Whether a lease document's holder is gone (see the module docstring)."""
    now = now or utcnow()
    if doc.get("host") == HOST and not _pid_alive(int(doc.get("pid", 0))):
        return True
    expires = doc.get("expires")
    return expires is None or expires <= now


class Lease:
    """A lease on ``key`` in ``coll`` lasting ``seconds`` unless renewed.

    Use :meth:`acquire` (or :meth:`try_acquire`), then :meth:`start_renewing`, and
    :meth:`release` at the end; :meth:`check` raises LeaseLost once a renewal found
    the lease gone.
    """

    def __init__(self, coll: Collection, key: Any, seconds: float):
        self.coll = coll
        self.key = key
        self.seconds = float(seconds)
        self.token = uuid.uuid4().hex
        self.held = False
        self._lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _doc(self) -> dict:
        now = utcnow()
        return {"_id": self.key, "token": self.token, "host": HOST, "pid": os.getpid(),
                "taken": now, "expires": now + timedelta(seconds=self.seconds)}

    def try_acquire(self) -> Optional[dict]:
        """Take the lease if free or stale; return None when taken, else the live holder."""
        for _ in range(5):  # a few rounds against racing takers
            try:
                self.coll.insert_one(self._doc())
                self.held = True
                return None
            except DuplicateKeyError:
                pass
            holder = self.coll.find_one({"_id": self.key})
            if holder is None:
                continue  # released in between: try again
            if not is_stale(holder):
                return holder
            log.info("removing stale lease %r of pid %s on %s", self.key,
                     holder.get("pid"), holder.get("host"))
            self.coll.delete_one({"_id": self.key, "token": holder.get("token")})
        holder = self.coll.find_one({"_id": self.key}) or {}
        return holder

    def acquire(self, wait: bool = False, timeout: Optional[float] = None,
                poll: float = 0.2, max_poll: float = 2.0) -> None:
        """Take the lease; raise LeaseBusy if held and not ``wait`` (or after ``timeout``).

        Waiting, it tries again after ``poll`` seconds, then half as long again each
        time, up to ``max_poll``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll
        while True:
            holder = self.try_acquire()
            if holder is None:
                return
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                raise LeaseBusy(self.key, holder)
            time.sleep(delay)
            delay = min(delay * 1.5, max_poll)

    def renew(self) -> None:
        """Push ``expires`` forward; raise LeaseLost if the lease is no longer ours."""
        res = self.coll.update_one(
            {"_id": self.key, "token": self.token},
            {"$set": {"expires": utcnow() + timedelta(seconds=self.seconds)}})
        if res.matched_count == 0:
            self._lost = f"lease on {self.key!r} lost (taken over after it expired)"
            raise LeaseLost(self._lost)

    def _renew_loop(self) -> None:
        interval = max(self.seconds / 3.0, 0.05)
        while not self._stop.wait(interval):
            try:
                self.renew()
            except LeaseLost:
                log.error("%s", self._lost)
                return
            except PyMongoError as e:  # the database blinked: retry until it expires
                log.warning("cannot renew lease on %r: %s", self.key, e)

    def start_renewing(self) -> None:
        """Renew in a background thread (a greenlet under gevent) every third of the term."""
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name=f"lease-{self.key}")
        self._thread.start()

    def check(self) -> None:
        """Raise LeaseLost if a renewal found that the lease was taken over."""
        if self._lost:
            raise LeaseLost(self._lost)

    def release(self) -> None:
        """Stop renewing and delete the lease document if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.held:
            self.coll.delete_one({"_id": self.key, "token": self.token})
            self.held = False

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def held(coll: Collection, key: Any, seconds: float, wait: bool = True) -> Lease:
    """Acquire a lease (waiting by default), renew it; use as a context manager."""
    lease = Lease(coll, key, seconds)
    lease.acquire(wait=wait)
    lease.start_renewing()
    return lease
