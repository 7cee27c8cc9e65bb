"""The zcmd commands: one module a command, and this registry of them.

``zcmd help`` lists the commands from :data:`COMMANDS` alone, without importing a
command module (fast); ``zcmd <name>`` imports only that command's module, which
defines ``add_arguments(parser)`` and ``run(config, args) -> int`` and imports the
engine it drives inside ``run``.  A command whose process runs under gevent (the
long-running services) says so: gevent patches the process before anything else
is imported.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One zcmd command: its module, its line of help, whether it needs gevent."""

    module: str
    summary: str
    gevent: bool = False


COMMANDS: dict[str, Command] = {
    "serve": Command("serve", "run the whole service: event logger, map-reduce router, "
                     "zmr.local_workers worker processes, the real-time aggregation loop "
                     "and the web service (when web_port is not 0)", gevent=True),
    "eventlog": Command("eventlog", "run only the event logger (stop with SIGTERM or "
                        "Ctrl-C; the journal is flushed)", gevent=True),
    "zmr-router": Command("zmr_router", "run the map-reduce router (clients and workers "
                          "connect to zmr.req_uri)", gevent=True),
    "zmr-worker": Command("zmr_worker", "run zmr.processes_per_worker worker processes "
                          "connected to zmr.req_uri"),
    "web-server": Command("web_server", "run only the web service: JSON query API, "
                          "dashboard and events over HTTP on web_bind:web_port",
                          gevent=True),
    "aggregate": Command("aggregate", "run one aggregation definition incrementally, or "
                         "in full ('full')"),
    "shell": Command("shell", "interactive Python (IPython if installed) with the model "
                     "loaded"),
    "script": Command("script", "run a Python file with the configured model"),
    "init": Command("init", "drop the Zarkov database (all events and aggregates)"),
    "status": Command("status", "the service on one screen: event servers, router and "
                      "workers, running jobs, each AggDef's last run and lag (--json); exit "
                      "1 when something is down"),
    "check-config": Command("check_config", "load and validate the config, print it "
                            "(secrets masked), and exit"),
    "keys": Command("keys", "make CURVE key pairs; authorise, revoke and list client keys"),
    "perftest": Command("perftest", "send n synthetic events at a rate (events/s, 0 = flat "
                        "out) for load tests"),
    "rotate": Command("rotate", "rotate event → event.0 → event.1 …, dumping the oldest "
                      "to a directory and dropping it"),
    "zmr-clean": Command("zmr_clean", "remove the router's temporary job files "
                         "(zmr.job_root)"),
}
