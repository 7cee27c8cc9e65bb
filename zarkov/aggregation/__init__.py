"""The aggregation service: runs of an AggDef, exactly once (docs/exactly-once.md).

``aggregation.run(config, name, full=False)`` folds the events an AggDef has not
counted yet into its ``zagg.*`` outputs, or recomputes them in full; its errors are
:class:`AggregationError` (:class:`BadDefinition`, :class:`Busy`).  The modules:

* :mod:`.driver` — one run from start to finish: the states of its record;
* :mod:`.scope` — what every step of a run works with, and the test hooks;
* :mod:`.records` — the run records in ``agg_run``;
* :mod:`.positions` — how far each AggDef has counted each event stream;
* :mod:`.marks` — marks and flags on events without a position;
* :mod:`.staging` — the Task's jobs, writing into staging (or handing back inline);
* :mod:`.merge` — after-images and applying them to the targets;
* :mod:`.status` — what the runs did, for people (``agg_status``).

Names are imported on first use, so that a submodule can be imported alone.
"""
from __future__ import annotations

from typing import Any

__all__ = ["run", "RunResult", "AggregationError", "BadDefinition", "Busy", "PAUSE_POINTS",
           "load_definition", "load_task_class"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from zarkov.aggregation import driver
        return getattr(driver, name)
    raise AttributeError(f"module 'zarkov.aggregation' has no attribute {name!r}")
