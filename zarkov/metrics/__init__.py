"""Prometheus metrics: what every Zarkov process shows at ``/metrics``.

The numbers already exist where each part keeps them (an event server's stats file,
the router's ``status`` reply, a worker's stats file, ``agg_status`` and the lag of
each AggDef); :mod:`.families` turns those snapshots into metric families at scrape
time, and :mod:`.endpoint` serves them over HTTP for a process run apart (the web
service serves its own, :mod:`zarkov.web.metrics`).  Names and labels are stable and
listed in the README ("Operating Zarkov", "Metrics").
"""
