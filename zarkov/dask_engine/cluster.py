"""Connecting to Dask: a scheduler's address, or a LocalCluster of our own on loopback.

Imported only by the gateway process (never by a gevent-patched one: see
docs/dask-engine.md).  TLS comes from Dask's own configuration object,
:class:`distributed.security.Security`, built from ``security.dask_tls_*``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from distributed import Client, LocalCluster
from distributed.security import Security

from zarkov.dask_engine.link import tls_files

#: Dask configuration of a ``local`` cluster's workers.  Why no profiler: it samples
#: every thread's stack every 10 ms, for a dashboard a local cluster does not serve,
#: and took about 10% of a scan task's time (0.78-0.86 s -> 0.67-0.75 s for 100,000
#: documents, docs/dask-engine.md).
LOCAL_WORKER_CONFIG = {"distributed.worker.profile.enabled": False}


def security_of(config: Any) -> Optional[Security]:
    """Dask's Security from ``security.dask_tls_{ca,cert,key}`` (None when unset)."""
    files = tls_files(config)
    if files is None:
        return None
    ca, cert, key = files
    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key,
                    tls_scheduler_cert=cert, tls_scheduler_key=key,
                    tls_worker_cert=cert, tls_worker_key=key, require_encryption=True)


def local_workers(config: Any) -> int:
    """Worker processes of a ``local`` cluster: ``zmr.dask_workers``, 0 = one per core."""
    n = int(config.zmr.dask_workers)
    return n if n > 0 else (os.cpu_count() or 1)


def connect(config: Any, timeout: float) -> tuple[Client, Optional[LocalCluster]]:
    """A Client of ``zmr.dask_scheduler``; ``local`` starts a LocalCluster on 127.0.0.1
    (one single-threaded worker process per core: maps are Python, bound by the GIL;
    without Dask's statistical profiler, see :data:`LOCAL_WORKER_CONFIG`)."""
    address = config.zmr.dask_scheduler
    sec = security_of(config)
    if address == "local":
        cluster = LocalCluster(n_workers=local_workers(config), threads_per_worker=1,
                               processes=True, host="127.0.0.1", dashboard_address=None,
                               protocol="tls://" if sec else "tcp://", security=sec,
                               silence_logs=logging.WARNING, config=LOCAL_WORKER_CONFIG)
        try:
            return Client(cluster, timeout=timeout, set_as_default=False), cluster
        except BaseException:
            cluster.close()
            raise
    kwargs = {"security": sec} if sec is not None else {}
    return Client(address, timeout=timeout, set_as_default=False, **kwargs), None
