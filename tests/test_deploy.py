"""deploy/: the systemd units and the cron table run real zcmd commands, with arguments
their own parsers accept and example configs that load and pass the checks the
commands make before they start.  Pure: no database, no process started (but
``systemd-analyze verify`` where it is installed)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

from tests.support import ROOT
from zarkov import config as C
from zarkov import keyfiles, security
from zarkov.cli import main as cli
from zarkov.cli.commands import COMMANDS

DEPLOY = Path(ROOT) / "deploy"
UNITS = sorted(DEPLOY.glob("*.service"))
CRON = DEPLOY / "zarkov.cron"
LOGROTATE = DEPLOY / "zarkov.logrotate"
#: Where the units and the cron table say the configs are installed.
ETC = "/etc/zarkov"
USER = "zarkov"
STATE = "/var/lib/zarkov"
LOGS = "/var/log/zarkov"
#: The ZeroMQ bind keys (README, "Security"): a command refuses to start (exit 2) when
#: one is beyond loopback without CURVE keys.
BIND_KEYS = ("bson_bind_address", "json_bind_address", "publish_bind_address",
             "zmr.req_bind", "zmr.worker_uri")


# -- reading the files ------------------------------------------------------------------

def unit_sections(text: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as ``{section: [(key, value), ...]}`` (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: Optional[list[tuple[str, str]]] = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):  # systemd joins a line ending in a backslash to the next
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{line!r} before any [section]"
        name, sep, value = line.partition("=")
        assert sep, f"not key=value: {line!r}"
        current.append((name.strip(), value.strip()))
    return sections


def unit_values(sections: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    """Every value of ``key`` in ``section`` (in order)."""
    return [v for k, v in sections.get(section, []) if k == key]


def unit_value(sections: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    """The one (last) value of ``key``; AssertionError when the unit does not set it."""
    values = unit_values(sections, section, key)
    assert values, f"[{section}] {key}= is not set"
    return values[-1]


def expand_specifiers(value: str, instance: Optional[str]) -> str:
    """``%i``/``%I`` -> the instance, ``%%`` -> ``%``; refuse other specifiers, whose
    values this test cannot know."""
    def one(m: re.Match) -> str:
        spec = m.group(1)
        if spec == "%":
            return "%"
        if spec in "iI" and instance is not None:
            return instance
        raise AssertionError(f"specifier %{spec} in {value!r}: the test cannot check it")
    return re.sub(r"%(.)", one, value)


def exec_argv(value: str) -> list[str]:
    """The argv of an ``ExecStart=`` value (without systemd's ``-@:+!`` prefixes)."""
    return shlex.split(value.lstrip("-@:+!"))


def cron_entries(text: str) -> list[tuple[list[str], str, str]]:
    """The entries of an /etc/cron.d table: ``(five time fields, user, command)``."""
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or re.match(r"^[A-Za-z_][A-Za-z0-9_]*\s*=", line):
            continue
        fields = line.split(None, 6)
        assert len(fields) == 7, f"not 'm h dom mon dow user command': {line!r}"
        out.append((fields[:5], fields[5], fields[6]))
    return out


# -- checking zcmd command lines --------------------------------------------------------

@dataclasses.dataclass
class ZcmdCall:
    """A zcmd command line, parsed by zcmd's own parsers."""

    command: str
    args: argparse.Namespace
    config_path: Optional[str]


def _parse(parser: argparse.ArgumentParser, argv: list[str], where: str) -> Any:
    # argparse reports an error by printing it and exiting 2: make it a test failure
    # that says what was wrong.
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        raise AssertionError(f"{where}: {shlex.join(argv)!r} refused by "
                             f"{parser.prog}: {err.getvalue().strip()}") from None


def check_zcmd(argv: list[str], where: str) -> ZcmdCall:
    """``argv`` runs zcmd (any path ending in ``/zcmd``), with options the top-level
    parser accepts, a command of the registry, and arguments that command's parser
    accepts; it names a config (``-y``) installed from a file of deploy/."""
    assert argv and argv[0].endswith("/zcmd"), f"{where}: not a zcmd command: {argv!r}"
    assert os.path.isabs(argv[0]), f"{where}: {argv[0]}: give zcmd's absolute path"
    opts = _parse(cli._parser(), argv[1:], where)
    assert not opts.help, f"{where}: -h/--help only prints the help"
    assert opts.command in COMMANDS, (
        f"{where}: {opts.command!r} is not a zcmd command (known: {', '.join(sorted(COMMANDS))})")
    args = _parse(cli.command_parser(opts.command), opts.args, where)
    assert opts.yaml, f"{where}: no -y FILE: the command would run on the defaults"
    assert os.path.dirname(opts.yaml) == ETC, f"{where}: {opts.yaml}: configs live in {ETC}"
    name = os.path.basename(opts.yaml)
    assert (DEPLOY / name).is_file(), f"{where}: {opts.yaml}: no deploy/{name} to install"
    return ZcmdCall(opts.command, args, opts.yaml)


# -- the example configs ----------------------------------------------------------------

def _make_key_files(data: dict[str, Any], base: Path, where: str) -> None:
    """Make the files the ``security`` section names (relative to ``base``), so that
    the config loads as it would on its host."""
    sec = data.get("security") or {}
    for name in C.SECURITY_PATHS:
        value = sec.get(name)
        if value is None:
            continue
        # Relative paths keep the example relocatable (and let this test make them).
        assert not os.path.isabs(value), f"{where}: security.{name}: use a path relative " \
                                         f"to the config ({value})"
        path = base / value
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "authorized_keys":
            path.mkdir(exist_ok=True)
        elif name.startswith("dask_tls_"):
            path.write_text("")
        else:
            suffix = keyfiles.SECRET_SUFFIX if value.endswith(keyfiles.SECRET_SUFFIX) \
                else keyfiles.PUBLIC_SUFFIX
            assert value.endswith(suffix), f"{where}: security.{name}: {value}: not a key file"
            if not path.exists():
                keyfiles.new_key_pair(str(path.parent), path.name[:-len(suffix)])


def unknown_keys(data: dict[str, Any]) -> list[str]:
    """The keys of ``data`` that the schema of zarkov.config does not have."""
    top = {f.name for f in dataclasses.fields(C.Config)} - {"source"}
    out = [k for k in data if k not in top]
    for section, cls in C.SECTIONS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        out += [f"{section}.{k}" for k in (data.get(section) or {}) if k not in names]
    return out


def load_example(name: str, tmp_path: Path) -> tuple[C.Config, dict[str, Any]]:
    """deploy/<name> loaded with zarkov.config.load, from a copy beside the key files
    it names; also its raw YAML."""
    text = (DEPLOY / name).read_text()
    data = yaml.safe_load(text)
    assert isinstance(data, dict), f"deploy/{name}: not a mapping"
    assert not unknown_keys(data), f"deploy/{name}: keys not in zarkov/config.py: " \
                                   f"{unknown_keys(data)}"
    home = tmp_path / name.replace(".", "_")
    home.mkdir(parents=True)
    _make_key_files(data, home, f"deploy/{name}")
    (home / name).write_text(text)
    return C.load(str(home / name)), data


def check_startup(config: C.Config, call: ZcmdCall) -> None:
    """What the command checks before it starts anything (each would exit 2)."""
    from zarkov.web.app import bind_problem as web_problem

    security.check_binds(config, BIND_KEYS)
    web = call.command == "web-server" or (
        call.command == "serve" and config.web_port > 0 and not call.args.no_web)
    if web:
        assert web_problem(config) is None, web_problem(config)
    if call.command == "web-server":
        port = call.args.port if call.args.port is not None else config.web_port
        assert 0 < port < 65536, f"{config.source}: web-server needs a web_port"
    m = config.metrics
    if m.eventlog_port or m.router_port or m.worker_port:
        problem = security.http_bind_problem(config, m.bind, "metrics.bind")
        assert problem is None, problem


def check_mongo_uri(uri: str, tmp_path: Path, where: str) -> None:
    """A replica set, authenticated, over TLS; pymongo accepts every option (the CA
    file made up, pymongo opens it)."""
    from pymongo import uri_parser
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    uri = re.sub(r"(?i)(tlsCAFile=)[^&]*", lambda m: m.group(1) + str(ca), uri)
    parsed = uri_parser.parse_uri(uri)
    options = parsed["options"]
    assert len(parsed["nodelist"]) >= 2, f"{where}: name the replica set's members"
    assert options.get("replicaSet") and parsed["username"] and options.get("authSource") \
        and options.get("tls") and options.get("tlsCAFile"), \
        f"{where}: mongo_uri needs replicaSet, a user, authSource, tls=true and tlsCAFile"


def _under(path: str, dirs: list[str]) -> bool:
    """``path`` is one of ``dirs`` or inside one."""
    path = os.path.normpath(path)
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


# -- the units --------------------------------------------------------------------------

def unit_instance(path: Path, sections: dict[str, list[tuple[str, str]]]) -> Optional[str]:
    """A template's instance (its DefaultInstance=), None for a plain unit."""
    if not path.name.endswith("@.service"):
        return None
    return unit_value(sections, "Install", "DefaultInstance")


def check_unit(path: Path, tmp_path: Path) -> tuple[ZcmdCall, C.Config]:
    """Everything this file asks of one unit; its zcmd call and the config it loads."""
    sections = unit_sections(path.read_text())
    instance = unit_instance(path, sections)
    svc = dict(sections.get("Service", []))
    for key, want in (("User", USER), ("WorkingDirectory", STATE), ("Restart", "on-failure"),
                      ("KillSignal", "SIGTERM"), ("NoNewPrivileges", "yes"),
                      ("ProtectSystem", "strict"), ("PrivateTmp", "yes")):
        assert svc.get(key) == want, f"{path.name}: {key}={svc.get(key)}, want {want}"
    stop = unit_value(sections, "Service", "TimeoutStopSec")
    assert stop.isdigit() and 10 <= int(stop) <= 600, f"{path.name}: TimeoutStopSec={stop}"
    starts = unit_values(sections, "Service", "ExecStart")
    assert len(starts) == 1, f"{path.name}: one ExecStart= (got {len(starts)})"
    argv = exec_argv(expand_specifiers(starts[0], instance))
    call = check_zcmd(argv, path.name)
    assert COMMANDS[call.command].module in ("serve", "zmr_worker", "web_server"), \
        f"{path.name}: {call.command} is not one of the long-running services"
    assert call.config_path is not None
    config, data = load_example(os.path.basename(call.config_path), tmp_path)
    check_startup(config, call)
    # What the service writes must be writable under ProtectSystem=strict.
    writable = [p for v in unit_values(sections, "Service", "ReadWritePaths") for p in v.split()]
    writable += [f"/var/lib/{d}" for v in unit_values(sections, "Service", "StateDirectory")
                 for d in v.split()]
    writable += [f"/var/log/{d}" for v in unit_values(sections, "Service", "LogsDirectory")
                 for d in v.split()]
    writable = [p.lstrip("-") for p in writable]
    journal = os.path.join(STATE, data.get("journal", config.journal))
    assert _under(journal, writable), f"{path.name}: journal {journal} not in {writable}"
    log_file = data.get("log_file", "-")
    if log_file != "-":
        log_file = os.path.join(os.path.dirname(call.config_path), log_file)
        assert _under(os.path.dirname(log_file), writable), \
            f"{path.name}: log_file {log_file} not in {writable}"
    assert _under(config.zmr.job_root, ["/tmp", *writable]), \
        f"{path.name}: zmr.job_root {config.zmr.job_root} is not writable"
    return call, config


def test_deploy_has_the_three_units():
    """One unit per role of the layout."""
    names = {p.name for p in UNITS}
    assert {"zarkov-serve.service", "zarkov-worker@.service", "zarkov-web.service"} <= names


@pytest.mark.parametrize("path", UNITS, ids=[p.name for p in UNITS])
def test_unit(path, tmp_path):
    """Each unit runs a real zcmd service with a config of deploy/ that loads."""
    check_unit(path, tmp_path)


def test_the_layout_splits_the_service_over_three_hosts(tmp_path):
    """Host 1 runs no web and no workers; the others reach its router, without its secret."""
    calls = {p.name: check_unit(p, tmp_path / p.name) for p in UNITS}
    serve, serve_config = calls["zarkov-serve.service"]
    assert serve.command == "serve" and serve.args.no_web, "the web service runs on host 3"
    assert serve_config.zmr.local_workers == 0, "the workers run on hosts 2..n"
    assert serve_config.security.server_key, "host 1 binds beyond loopback: CURVE keys"
    worker, worker_config = calls["zarkov-worker@.service"]
    assert worker.command == "zmr-worker"
    assert worker_config.zmr.req_uri == serve_config.zmr.req_uri
    assert worker_config.security.server_key is None, "the servers' secret stays on host 1"
    web, web_config = calls["zarkov-web.service"]
    assert web.command == "web-server"
    assert web_config.zmr.req_uri == serve_config.zmr.req_uri
    assert web_config.security.server_key is None, "the servers' secret stays on host 1"


@pytest.mark.parametrize("name", sorted(p.name for p in DEPLOY.glob("*.yaml")))
def test_example_config_loads(name, tmp_path):
    """Every example config loads; a mongo_uri is a TLS replica set with a user."""
    _, data = load_example(name, tmp_path)
    if "mongo_uri" in data:
        check_mongo_uri(data["mongo_uri"], tmp_path, f"deploy/{name}")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_finds_nothing(tmp_path):
    """systemd itself knows every key and value of the units."""
    # Copies whose zcmd is an executable of this host (verify checks that it is), and
    # the template under its default instance's name.
    names = []
    for path in UNITS:
        sections = unit_sections(path.read_text())
        zcmd = exec_argv(unit_value(sections, "Service", "ExecStart"))[0]
        text = path.read_text().replace(zcmd, sys.executable)
        instance = unit_instance(path, sections)
        name = path.name.replace("@.", f"@{instance}.") if instance else path.name
        (tmp_path / name).write_text(text)
        names.append(name)
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    # Only what concerns these files: the host's own units may have their own issues.
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if any(n in line for n in names)]
    assert not problems, "\n".join(problems)


# -- the cron table ---------------------------------------------------------------------

_SHELL_OPS = ("|", "||", "&&", ";", "&")
_CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


def check_cron_entry(fields: list[str], user: str, command: str) -> tuple[ZcmdCall, list[str]]:
    """One entry: valid time fields, run as zarkov, no '%' (cron makes it a newline),
    ``flock -n|-w N <lock>`` around an absolute zcmd with valid arguments; its call and
    the files it writes (lock, redirections)."""
    where = f"zarkov.cron: {command}"
    assert all(_CRON_FIELD.match(f) for f in fields), f"{where}: bad time fields {fields}"
    assert user == USER, f"{where}: runs as {user}, not {USER}"
    assert "%" not in command, f"{where}: cron turns '%' into a newline"
    tokens = shlex.split(command)
    end = next((i for i, t in enumerate(tokens) if t in _SHELL_OPS or ">" in t or "<" in t),
               len(tokens))
    words, redirections = tokens[:end], tokens[end:]
    assert not any(t in _SHELL_OPS for t in redirections), f"{where}: one command per entry"
    zcmd = next((i for i, w in enumerate(words) if w.endswith("/zcmd")), None)
    assert zcmd is not None, f"{where}: runs no zcmd"
    wrapper = words[:zcmd]
    assert wrapper and os.path.basename(wrapper[0]) == "flock", \
        f"{where}: wrap it in flock so that runs do not pile up"
    assert ("-n" in wrapper or "-w" in wrapper) and len(wrapper) >= 3, \
        f"{where}: flock -n (or -w SECONDS) <lock file>"
    call = check_zcmd(words[zcmd:], where)
    written = [wrapper[-1]] + [re.sub(r"^\d*>>?", "", t) for t in redirections
                               if re.match(r"^\d*>>?[^&]", t)]
    return call, written


def test_cron_runs_real_commands():
    """aggregate hourly, rotate daily, each under its own flock, writing where it may."""
    entries = cron_entries(CRON.read_text())
    calls = [check_cron_entry(*e) for e in entries]
    commands = {call.command for call, _ in calls}
    assert {"aggregate", "rotate"} <= commands
    locks = [written[0] for _, written in calls]
    assert len(set(locks)) == len(locks), "one lock per entry: one AggDef never blocks another"
    for (fields, _, _), (call, written) in zip(entries, calls):
        assert all(_under(w, [STATE, LOGS]) for w in written), \
            f"{written}: the zarkov user writes in {STATE} and {LOGS} only"
        minute, hour, dom, month, dow = fields
        if call.command == "aggregate":
            assert minute.isdigit() and (hour, dom, month, dow) == ("*",) * 4, "hourly"
        if call.command == "rotate":
            assert minute.isdigit() and hour.isdigit() and (dom, month, dow) == ("*",) * 3, \
                "daily"


# -- logrotate --------------------------------------------------------------------------

def test_logrotate_covers_every_log_and_needs_no_signal():
    """Every log file of the configs and the cron table is rotated, in create mode."""
    text = LOGROTATE.read_text()
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    patterns = body.split("{", 1)[0].split()
    directives = body.split("{", 1)[1].split("}", 1)[0]
    logs = [yaml.safe_load((DEPLOY / p.name).read_text()).get("log_file", "-")
            for p in DEPLOY.glob("*.yaml")]
    logs += [w for e in cron_entries(CRON.read_text()) for w in check_cron_entry(*e)[1][1:]]
    for log in logs:
        if log != "-":
            assert any(fnmatch.fnmatch(log, p) for p in patterns), f"{log} is not rotated"
    # Zarkov reopens log_file after a rename (logging's WatchedFileHandler): the
    # default rename-and-create mode is right, and the new file must be the user's.
    assert "copytruncate" not in directives
    assert re.search(rf"^\s*create\s+0[0-7]{{3}}\s+{USER}\s+{USER}\s*$", directives, re.M)


# -- the checks themselves fail ---------------------------------------------------------

@pytest.mark.parametrize("line, why", [
    ("/opt/zarkov/venv/bin/zcmd -y /etc/zarkov/production.yaml serv", "not a zcmd command"),
    ("/opt/zarkov/venv/bin/zcmd -y /etc/zarkov/production.yaml serve --no-webb", "refused"),
    ("/opt/zarkov/venv/bin/zcmd --yml /etc/zarkov/production.yaml serve", "refused"),
    ("/opt/zarkov/venv/bin/zcmd -y /etc/zarkov/prod.yaml serve", "no deploy/prod.yaml"),
    ("/opt/zarkov/venv/bin/zcmd serve", "no -y FILE"),
    ("/opt/zarkov/venv/bin/python -m zarkov serve", "not a zcmd command"),
    ("/opt/zarkov/venv/bin/zcmd -y /etc/zarkov/production.yaml rotate", "refused"),
])
def test_check_zcmd_refuses(line, why):
    """A misspelt command or option, a missing config: the unit checks fail."""
    with pytest.raises(AssertionError, match=why):
        check_zcmd(shlex.split(line), "test")


@pytest.mark.parametrize("line, why", [
    ("7 * * * * zarkov /opt/z/bin/zcmd -y /etc/zarkov/production.yaml aggregate a", "flock"),
    ("7 * * * * root flock -n /var/lib/zarkov/a.lock /opt/z/bin/zcmd "
     "-y /etc/zarkov/production.yaml aggregate a", "not zarkov"),
    ("7 * * * * zarkov flock -n /var/lib/zarkov/a.lock /opt/z/bin/zcmd "
     "-y /etc/zarkov/production.yaml aggregate a full fast", "refused"),
    ("7 * * * * zarkov flock -n /var/lib/zarkov/a.lock /opt/z/bin/zcmd "
     "-y /etc/zarkov/production.yaml aggregate a >/tmp/$(date +%F).log", "newline"),
])
def test_check_cron_entry_refuses(line, why):
    """No flock, another user, bad arguments, a '%': the cron checks fail."""
    (entry,) = cron_entries(line)
    with pytest.raises(AssertionError, match=why):
        check_cron_entry(*entry)


def test_unknown_config_keys_are_found():
    """A key the schema lacks is named, top level or in a section."""
    assert unknown_keys({"mongo_uri": "x", "metrics": {"bind": "x", "port": 1},
                         "zmr": {"req_uri": "x"}, "web_tokn": "x"}) == ["web_tokn", "metrics.port"]


def test_unit_checks_fail_on_a_bad_unit(tmp_path):
    """A misspelt command, a weaker ProtectSystem, an unwritable journal: check_unit fails."""
    good = (DEPLOY / "zarkov-web.service").read_text()
    for bad, why in ((good.replace("web-server", "web-sever"), "not a zcmd command"),
                     (good.replace("ProtectSystem=strict", "ProtectSystem=full"),
                      "ProtectSystem"),
                     (good.replace("ReadWritePaths=/var/lib/zarkov /var/log/zarkov\n", "")
                      .replace("StateDirectory=zarkov\n", ""), "journal")):
        path = tmp_path / "zarkov-web.service"
        path.write_text(bad)
        with pytest.raises(AssertionError, match=why):
            check_unit(path, tmp_path / why)
