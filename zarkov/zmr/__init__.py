"""The ZeroMQ map-reduce cluster: a router (gevent) and pools of worker processes.

Data flows one way: the router reads the input collections as raw BSON and cuts it
into chunks (:mod:`.reader`); workers map and combine each chunk and split the
result into partitions by key (:mod:`.compute`, :mod:`.partition`); the router
appends partitions to files under ``job_root`` (:mod:`.spill`); each partition is
reduced (and finalized) on a worker; the router writes the outputs (:mod:`.commit`).
:mod:`.dispatch` keeps chunks in flight and sends again those not answered in time;
:mod:`.job` runs the phases; :mod:`.router` owns sockets and jobs; :mod:`.pool`
runs worker processes (:mod:`.worker`); :mod:`.client` is for those who submit jobs.
"""
