"""One-line, bounded renderings of untrusted values for log lines, rejects and replies.

A key, a ``$command`` or an exception message may be megabytes long or span lines;
what Zarkov says about it must stay one short line.
"""
from __future__ import annotations

import reprlib
from typing import Any

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
MAX_REPR = 100


def short_repr(value: Any) -> str:
    """A repr of ``value`` of at most about 100 characters."""
    text = _repr.repr(value)
    return text if len(text) <= MAX_REPR else text[:MAX_REPR - 3] + "..."


def first_line(error: BaseException | str, n: int = 120) -> str:
    """The first line of an error's message, at most ``n`` characters."""
    text = str(error).strip().split("\n", 1)[0]
    return text if len(text) <= n else text[:n] + "..."
