"""Histogram buckets kept as plain numbers, so that any process can keep one in a stats
file or a database document and the metrics endpoint can show it as a Prometheus
histogram (:mod:`zarkov.metrics`).

Counts are kept per bucket (not cumulative): one increment per observation, which a
database ``$inc`` can do too; :func:`cumulative` gives Prometheus's form.
"""
from __future__ import annotations

import bisect
from typing import Any, Sequence

#: Seconds from an event's arrival to its acknowledged insert (one batch each).
COMMIT_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Seconds of an aggregation run.
RUN_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0)


def bucket(bounds: Sequence[float], value: float) -> int:
    """The index of the bucket ``value`` falls in (``len(bounds)``: above the last)."""
    return bisect.bisect_left(bounds, value)


class Histogram:
    """Counts per bucket, their sum and count: ``as_dict()`` is JSON-ready."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bucket(self.bounds, value)] += 1
        self.sum += value

    def as_dict(self) -> dict[str, Any]:
        """``{bounds, counts, sum}``."""
        return {"bounds": list(self.bounds), "counts": list(self.counts),
                "sum": round(self.sum, 6)}


def cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, int]]:
    """Prometheus's buckets: ``[(le, observations <= le), ..., ("+Inf", all)]``."""
    out, total = [], 0
    for le, n in zip([*map(float, bounds), float("inf")], counts):
        total += int(n)
        out.append(("+Inf" if le == float("inf") else repr(le), total))
    return out
