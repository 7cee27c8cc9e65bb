"""One module per zcmd command.  COMMANDS maps a command name to its module."""

COMMANDS: dict[str, str] = {
    "check-config": "check_config",
    "serve": "serve",
    "zmr-router": "zmr_router",
    "zmr-worker": "zmr_worker",
    "zmr-clean": "zmr_clean",
    "aggregate": "aggregate",
    "shell": "shell",
    "script": "script",
    "init": "init",
    "eventlog": "eventlog",
    "perftest": "perftest",
    "rotate": "rotate",
    "web-server": "web_server",
    "keys": "keys",
}
