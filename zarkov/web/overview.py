"""The whole service on one page: what ``zcmd status`` prints (and ``--json`` gives).

Event servers (from their stats files under ``journal``, so on the host that runs
them), the event streams of every host that stored events lately (from the registry
in the database), the router and its workers, the jobs running on both engines, every AggDef
with its last run and its lag.  ``problems`` lists what is down or behind, one line
each; :func:`overview` says whether anything is down, for a health check's exit code.
"""
from __future__ import annotations

import time
from typing import Any

from pymongo.database import Database
from pymongo.errors import PyMongoError

from zarkov import streams as registry
from zarkov.config import Config
from zarkov.eventlog.stats import read_stats
from zarkov.lease import utc_seconds
from zarkov.metrics.families import alive
from zarkov.web import status

#: Seconds of commits over which an event server's rate is computed.
RATE_WINDOW = 60.0
#: Seconds since its last insert within which a stream is listed (each crash of an
#: event server begins a new stream: the older ones are only counted).
STREAMS_SHOWN = 3600.0


def _rate(commits: list, started: float, now: float) -> float:
    """Events committed per second over the last :data:`RATE_WINDOW` seconds (or
    since the process started, when that is later); ``commits`` are the (time,
    committed so far) points after its recent inserts."""
    since = max(now - RATE_WINDOW, started)
    if not commits or now - since < 1.0:
        return 0.0
    before = [n for t, n in commits if t <= since]
    # A point older than the window gives the count at its start; else the process
    # started within it (at 0), or the timeline (the last 64 inserts) is shorter.
    base = before[-1] if before else (0 if since == started else commits[0][1])
    return max(0, commits[-1][1] - base) / (now - since)


def event_servers(config: Config, now: float) -> list[dict[str, Any]]:
    """The event-server processes whose stats files are under ``journal`` (this host)."""
    out = []
    for snap in read_stats(config.journal):
        if snap.get("index", 0) < 0:
            continue  # the proxy's refusals, not a server
        out.append({"index": snap.get("index"), "pid": snap.get("pid"),
                    "alive": alive(snap.get("pid")),
                    "accepted": snap.get("accepted", 0), "committed": snap.get("committed", 0),
                    "rejected": snap.get("rejected", 0),
                    "backlog_files": snap.get("backlog_files", 0),
                    "db_ok": snap.get("db_ok", True),
                    "rate": round(_rate(snap.get("commits") or [],
                                        float(snap.get("started") or 0), now), 1)})
    return out


def event_streams(db: Database, now: float) -> tuple[list[dict[str, Any]], int]:
    """The streams that stored events in the last :data:`STREAMS_SHOWN` seconds, on
    every host (newest first), and how many others the registry holds."""
    shown, older = [], 0
    for doc in registry.listing(db):
        if now - utc_seconds(doc["updated"]) > STREAMS_SHOWN:
            older += 1
            continue
        shown.append({"stream": doc["_id"], "collection": doc.get("collection"),
                      "host": doc.get("host"), "pid": doc.get("pid"),
                      "stored": doc["stored"], "updated": doc["updated"]})
    return shown, older


def overview(config: Config, db: Database) -> tuple[dict[str, Any], bool]:
    """Everything ``zcmd status`` shows, and whether nothing is down."""
    now = time.time()
    problems: list[str] = []
    down = False
    try:
        db.command("ping")
        database: dict[str, Any] = {"ok": True, "name": config.mongo_database}
    except PyMongoError as e:
        database = {"ok": False, "name": config.mongo_database, "error": str(e)[:300]}
        problems.append(f"database {config.mongo_database}: does not answer ({e})"[:300])
        down = True
    servers = event_servers(config, now)
    for s in servers:
        if not s["alive"]:
            problems.append(f"event server {s['index']} (pid {s['pid']}) is not running")
            down = True
        elif not s["db_ok"]:
            problems.append(f"event server {s['index']}: cannot store ({s['backlog_files']} "
                            "journal files waiting)")
    jobs: dict[str, Any] = status.jobs(config, db) if database["ok"] else {
        "router": {"ok": False, "uri": config.zmr.req_uri, "error": "no database"}, "jobs": []}
    router: dict[str, Any] = jobs["router"]
    if not router["ok"]:
        problems.append(f"router {config.zmr.req_uri}: {router.get('error')}")
        down = True
    shown, older = event_streams(db, now) if database["ok"] else ([], 0)
    aggdefs = status.aggdefs(db, config.lag_warning_seconds) if database["ok"] else []
    for a in aggdefs:
        if a["lag"]["late"]:
            problems.append(f"AggDef {a['name']}: {a['lag']['waiting']} events waiting, the "
                            f"oldest for {a['lag']['oldest_age']:.0f} s")
    running = [j for j in jobs["jobs"] if j.get("ended") is None and j.get("state") != "lost"]
    return {"ok": not down, "database": database, "event_servers": servers,
            "streams": shown, "streams_older": older, "router": router,
            "jobs_running": running, "aggdefs": aggdefs, "problems": problems}, not down
