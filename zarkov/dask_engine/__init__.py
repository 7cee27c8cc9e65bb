"""The Dask engine: the same Tasks and map-reduce requests, run on Dask distributed.

Chosen with ``zmr.engine: dask`` (or ``zcmd aggregate NAME --engine dask``); the
router stays the default.  :mod:`.engine` is what the rest of Zarkov calls (it
imports no Dask); :mod:`.gateway` is the process that holds the Dask Client;
:mod:`.job` runs one job as a Dask graph; :mod:`.split` cuts the input into pieces
that workers read from the database; :mod:`.tasks` is what the workers run.
docs/dask-engine.md explains the design and its limits.
"""
