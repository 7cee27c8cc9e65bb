"""The worker process pool: ``n`` map-reduce worker processes, restarted when they exit.

Each process is ``python -m zarkov.zmr.worker``, started and kept running by a
:class:`zarkov.runtime.children.Children` (one restart policy for every kind of
child: a worker recycled after ``requests_per_worker_process`` tasks or past
``suicide_level`` KiB, or killed, is replaced; one that keeps dying at start-up is
restarted with a growing delay).  The worker reads the config its parent hands it.

Works in a plain process (``zcmd zmr-worker``) and under gevent (``zcmd serve``).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Optional

from zarkov.config import Config, worker_processes
from zarkov.metrics.endpoint import MetricsServer
from zarkov.metrics.families import worker_families
from zarkov.runtime.children import Children
from zarkov.zmr import workerstats

log = logging.getLogger("zarkov.zmr.pool")


class WorkerPool:
    """``n`` worker processes connected to the router at ``config.zmr.req_uri``."""

    def __init__(self, config: Config, n: Optional[int] = None):
        z = config.zmr
        self.count = worker_processes(z.processes_per_worker if n is None else n)
        self.children = Children("worker pool", "zarkov.zmr.worker", self.count, config,
                                 fault_point="pool.monitor")
        self.config = config
        self.metrics: Optional[MetricsServer] = None
        self._stats_dir = workerstats.stats_dir(os.getpid())

    def pids(self) -> list[int]:
        """Process ids of the running worker processes."""
        return self.children.pids()

    @property
    def restarts(self) -> int:
        """Worker processes started again since the pool started."""
        return self.children.restarts

    def _metric_families(self) -> list:
        """The pool's series for ``/metrics``, from its processes' stats files."""
        return worker_families(workerstats.read_all(self._stats_dir))

    def start(self) -> "WorkerPool":
        """Start the processes and the monitor that restarts them."""
        port = self.config.metrics.worker_port
        if port:
            shutil.rmtree(self._stats_dir, ignore_errors=True)  # a former pid's
            os.makedirs(self._stats_dir, exist_ok=True)
            self.metrics = MetricsServer(self.config, port, "worker pool",
                                         self._metric_families).start()
        self.children.start()
        log.info("worker pool: %d processes %s", self.count, self.pids())
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the processes: SIGTERM, SIGKILL after ``timeout`` s."""
        started = time.monotonic()
        self.children.stop(timeout)
        if self.metrics is not None:
            self.metrics.stop()
            shutil.rmtree(self._stats_dir, ignore_errors=True)
        log.info("worker pool stopped (%.1f s)", time.monotonic() - started)
        return True
