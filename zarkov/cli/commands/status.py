"""zcmd status: the service on one screen; exit 1 when something is down."""
from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

from zarkov.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print it as one JSON document (for scripts)")


def run(config: Config, args: argparse.Namespace) -> int:
    import pymongo

    from zarkov.web.overview import overview
    client: pymongo.MongoClient = pymongo.MongoClient(config.mongo_uri,
                                                      serverSelectionTimeoutMS=3000)
    try:
        report, ok = overview(config, client[config.mongo_database])
    finally:
        client.close()
    if args.json:
        print(json.dumps(report, default=_json_value, indent=1))
    else:
        print("\n".join(lines(report)))
    return 0 if ok else 1


def _json_value(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return str(value)


def _ago(when: Any) -> str:
    if not isinstance(when, dt.datetime):
        return "?"
    seconds = (dt.datetime.utcnow() - when.replace(tzinfo=None)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{max(0, seconds):.0f} s ago"


def lines(r: dict[str, Any]) -> list[str]:
    """The report as the terminal shows it."""
    db = r["database"]
    out = [f"zarkov: {'ok' if r['ok'] else 'DOWN'}",
           f"database    {db['name']}: {'ok' if db['ok'] else 'does not answer'}"]
    servers = r["event_servers"]
    if not servers:
        out.append("events      no event server on this host (no stats under journal)")
    for s in servers:
        state = f"pid {s['pid']}" if s["alive"] else f"pid {s['pid']} NOT RUNNING"
        out.append(f"events      server {s['index']} ({state}): {s['accepted']:,} accepted, "
                   f"{s['committed']:,} stored, {s['rejected']:,} rejected, "
                   f"{s['rate']:,.1f}/s, {s['backlog_files']} journal files waiting")
    for st in r["streams"]:
        out.append(f"stream      {st['stream']} ({st['collection']}) on {st['host']}, "
                   f"pid {st['pid']}: stored up to {st['stored']:,}, last insert "
                   f"{_ago(st['updated'])}")
    if r["streams_older"]:
        out.append(f"stream      and {r['streams_older']} more with no insert for an hour "
                   "or longer")
    router = r["router"]
    if router["ok"]:
        out.append(f"router      {router['uri']}: {router.get('workers', 0)} worker "
                   f"process(es), {router.get('jobs_running', 0)} job(s) running")
    else:
        out.append(f"router      {router['uri']}: does not answer")
    for j in r["jobs_running"]:
        total = j.get("chunks_total") or 0
        progress = (f"{j.get('partitions_done', 0)}/{j['partitions_total']} partitions"
                    if j.get("partitions_total") else f"{j.get('chunks_done', 0)}/{total} chunks")
        out.append(f"job         {j['job_id'][:8]} {j.get('engine', 'router')} for "
                   f"{j.get('aggdef') or j.get('output')}: {j.get('phase')} {progress}, "
                   f"{j.get('docs_read', 0):,} docs read, {j.get('elapsed') or 0:.1f} s")
    if not r["aggdefs"]:
        out.append("aggdefs     none defined")
    for a in r["aggdefs"]:
        last = a.get("last_work") or a.get("last")
        run = (f"last run {_ago(last.get('ended'))}, {last.get('docs', 0):,} docs in "
               f"{last.get('seconds', 0):.2f} s" if last else "never run")
        lag = a["lag"]
        waiting = (f"{lag['waiting']:,} waiting, oldest {lag['oldest_age']:.0f} s"
                   + (" LATE" if lag["late"] else "")) if lag["waiting"] else "up to date"
        now = " · running" if a.get("running") else ""
        error = f" · last error: {a['last_error']['message']}" if (
            a.get("last_error") and not a.get("last")) else ""
        out.append(f"aggdef      {a['name']}: {run}; {waiting}{now}{error}")
    for p in r["problems"]:
        out.append(f"problem     {p}")
    return out
