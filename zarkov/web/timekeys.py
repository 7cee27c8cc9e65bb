"""Keys of ``zagg.*`` documents as time: what makes a collection a time series.

A key is a point in time when it is a datetime, or a string that ends in an ISO
8601 date or date-time (``2011-07-22``, ``sf.net:2011-07-22T10:05``,
``login/2011-07-22 10:05:30Z``).  :func:`key_millis` gives its milliseconds since
the epoch (naive times are UTC), ready for a chart; :func:`parse_bound` reads a
query bound written as an ISO date or date-time.
"""
from __future__ import annotations

import datetime as dt
import functools
import re
from typing import Any, Optional

_EPOCH = dt.datetime(1970, 1, 1)
_ISO = (r"(\d{4})-(\d{2})-(\d{2})"
        r"(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?)?"
        r"(Z|[+-]\d{2}:?\d{2})?")
_TAIL = re.compile(r"(?<!\d)" + _ISO + r"$")
_WHOLE = re.compile(_ISO)


def _millis(m: re.Match) -> Optional[int]:
    year, month, day, hour, minute, second, frac, zone = m.groups()
    try:
        when = dt.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                           int(second or 0), int((frac or "0").ljust(6, "0")))
    except ValueError:  # 2011-13-40 and the like: not a date
        return None
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        try:
            when -= sign * dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        except OverflowError:  # year 1 or 9999 pushed out of range by the offset
            return None
    return _to_millis(when)


def _to_millis(when: dt.datetime) -> int:
    if when.tzinfo is not None:
        when = when.astimezone(dt.timezone.utc).replace(tzinfo=None)
    delta = when - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1000 + delta.microseconds // 1000


def key_millis(key: Any) -> Optional[int]:
    """Milliseconds since the epoch of a time key, or None when the key is not one."""
    if isinstance(key, dt.datetime):
        return _to_millis(key)
    if isinstance(key, str) and len(key) >= 10:
        return _str_millis(key)
    return None


@functools.lru_cache(maxsize=1 << 16)
def _str_millis(key: str) -> Optional[int]:
    # Why a cache: /q reads the same keys again and again (a dashboard refreshing its
    # ranges), and parsing one cost more than reading it from the database.
    m = _TAIL.search(key)
    return _millis(m) if m else None


def parse_bound(text: str) -> Optional[dt.datetime]:
    """The naive UTC datetime written by ``text`` (an ISO date or date-time), or None."""
    m = _WHOLE.fullmatch(text)
    if not m:
        return None
    ms = _millis(m)
    return None if ms is None else _EPOCH + dt.timedelta(milliseconds=ms)
