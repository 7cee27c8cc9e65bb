"""What the service is doing: ``/aggdefs``, ``/jobs`` and ``/health``.

``/aggdefs`` joins the AggDefs with what their runs recorded (:mod:`zarkov.aggregation.status`),
the pending run records (``agg_run``) and the leases (``agg_lease``): a ``running``
entry counts only while its lease is held; and each AggDef's ``lag``: the events
waiting to be counted and the age of the oldest (:func:`zarkov.aggregation.positions.lag`),
``late`` past ``lag_warning_seconds``.  ``/jobs`` asks the map-reduce router
for its running and recent jobs (``status`` without a job id) and names the AggDef
each aggregation job works for.
"""
from __future__ import annotations

from typing import Any, Optional

from pymongo.database import Database
from pymongo.errors import PyMongoError

from zarkov import security, wire
from zarkov.aggregation import positions
from zarkov.aggregation import status as agg_status
from zarkov.aggregation.scope import STAGING_PREFIX as STAGING
from zarkov.config import Config
from zarkov.dask_engine import registry
from zarkov.lease import is_stale

ROUTER_TIMEOUT = 2.0


def aggdefs(db: Database, late_after: float = 60.0) -> list[dict[str, Any]]:
    """Every AggDef with its last run, last error, the run going on, if any, and its
    lag (``late`` when its oldest waiting event is older than ``late_after`` s)."""
    statuses = agg_status.read_all(db)
    pending = {d["_id"]: d for d in db.agg_run.find({}) if isinstance(d.get("_id"), str)}
    leases = {d["_id"]: d for d in db.agg_lease.find({}) if isinstance(d.get("_id"), str)}
    out = []
    for d in db.agg_def.find({}).sort("name", 1):
        name = d.get("name")
        st = statuses.get(name, {})
        lease = leases.get(name)
        # Running: the lease is held by the process that reported progress.  (A run
        # that ends within half a second, as real-time runs with nothing new do,
        # reports none and is not worth showing.)
        report = st.get("running") or {}
        running: Optional[dict] = None
        holder = (lease.get("pid"), lease.get("host")) if lease is not None else None
        if (lease is not None and report and not is_stale(lease)
                and (report.get("pid"), report.get("host")) == holder):
            running = dict(report)
            run = pending.get(name)
            if run is not None:
                running.update(state=run.get("state"), marked=run.get("marked"),
                               run_id=run.get("run_id"))
        lag = positions.lag(db, name, d.get("object") or "event")
        lag["late"] = lag["oldest_age"] is not None and lag["oldest_age"] > late_after
        out.append({"name": name, "object": d.get("object") or "event", "lag": lag,
                    "task_name": d.get("task_name"), "realtime": bool(d.get("realtime")),
                    "last_run": d.get("last_run"), "last": st.get("last"),
                    "last_work": st.get("last_work"),
                    "last_error": st.get("last_error"), "running": running,
                    "runs": agg_status.runs_of(st),
                    # A run record nobody works on: left by a killed run, finished by the next.
                    "pending": (pending[name].get("state") if name in pending and (
                        lease is None or is_stale(lease)) else None)})
    return out


def router_status(config: Config, recent: int = 20,
                  timeout: float = ROUTER_TIMEOUT) -> dict[str, Any]:
    """The router's ``status`` reply, or ``{"error": ...}`` when it does not answer."""
    try:
        reply = wire.request(config.zmr.req_uri, {"$command": "status", "recent": recent},
                             timeout=timeout, keys=security.client_keys(config))
    except wire.WireError as e:
        return {"error": str(e)}
    return reply


class RunNames:
    """Which AggDef each aggregation run id belongs to, as far as this process has seen.

    The router knows a job's output (``zstage.<run_id>.<attempt>.<n>``), not its AggDef;
    run ids are read from pending runs and last runs each time jobs are listed, and
    remembered (the last ``KEEP``) after their records are gone.
    """

    KEEP = 2000

    def __init__(self):
        self.names: dict[str, str] = {}

    def refresh(self, db: Database) -> None:
        """Learn the run ids of the pending and last runs."""
        for d in db.agg_run.find({}, {"run_id": 1}):
            self.names[str(d.get("run_id"))] = d["_id"]
        for name, st in agg_status.read_all(db).items():
            for key in ("last", "last_work"):
                if isinstance(st.get(key), dict):
                    self.names[str(st[key].get("run_id"))] = name
        while len(self.names) > self.KEEP:
            del self.names[next(iter(self.names))]


def jobs(config: Config, db: Database, recent: int = 20,
         runs: Optional[RunNames] = None) -> dict[str, Any]:
    """Running and recent jobs of this database on both engines (the router's, and
    the Dask engine's from ``dask_job``), newest first, each with the AggDef it works
    for."""
    reply = router_status(config, recent)
    if "error" in reply:
        router = {"ok": False, "uri": config.zmr.req_uri, "error": reply["error"]}
    else:
        router = {"ok": True, "uri": config.zmr.req_uri, "workers": reply.get("workers", 0),
                  "jobs_running": reply.get("jobs_running", 0)}
    found = [{"engine": "router", **job} for job in reply.get("jobs", [])]
    try:
        dask_jobs = registry.read(db, recent)
    except PyMongoError:
        dask_jobs = []  # the router's are still worth showing
    found += dask_jobs
    runs = runs or RunNames()
    try:
        runs.refresh(db)
    except PyMongoError:
        pass  # the jobs are still worth showing
    out = []
    for job in found:
        if job.get("database") != config.mongo_database:
            continue
        output = str(job.get("output") or "")
        if output.startswith(STAGING):
            job["aggdef"] = runs.names.get(output[len(STAGING):].split(".", 1)[0])
        out.append(job)
    out.sort(key=lambda j: (j.get("ended") is None, j.get("created") or 0), reverse=True)
    return {"router": router,
            "dask": {"jobs_running": sum(1 for j in dask_jobs if j.get("state") != "lost"
                                         and j.get("ended") is None)},
            "jobs": out}


def health(config: Config, db: Database, intake: Any, rate: Any) -> tuple[dict, bool]:
    """The service's health and whether it can serve (the database answers)."""
    out: dict[str, Any] = {"database": config.mongo_database}
    try:
        db.command("ping")
        out["database_ok"] = True
    except PyMongoError as e:
        out["database_ok"] = False
        out["database_error"] = str(e)[:300]
    reply = router_status(config, 0, timeout=1.0)  # a health probe must answer fast
    out["router_ok"] = "error" not in reply
    if out["router_ok"]:
        out["workers"] = reply.get("workers", 0)
    if rate is not None:
        out["events"] = rate.report(60, 10)["totals"]
    out["intake"] = intake is not None
    out["ok"] = out["database_ok"]
    return out, out["ok"]
