"""The config schema and the zcmd front door: defaults, validation, help, exit codes,
logging to the configured file."""
import os
import signal
import subprocess
import sys

import pytest

from tests.support import ROOT, ZCMD, proc_env, run_zcmd, wait_for
from zarkov import config as C


def test_defaults_cover_every_key_of_the_spec():
    cfg = C.from_dict({})
    assert cfg.mongo_uri == "mongodb://localhost:27017"
    assert cfg.mongo_database == "zarkov"
    assert cfg.journal_file_size == 262144
    assert cfg.zmr.reduce_count == 256
    assert cfg.zmr.map_chunk_size == 5000000
    assert cfg.zmr.job_root == "/tmp/zmr"
    assert cfg.zmr.suicide_level == 3145728


def test_partial_zmr_section_keeps_other_defaults():
    cfg = C.from_dict({"zmr": {"reduce_count": 4}})
    assert cfg.zmr.reduce_count == 4
    assert cfg.zmr.outstanding_chunks == 4


def test_overrides_use_dotted_keys(tmp_path):
    path = tmp_path / "z.yaml"
    path.write_text("mongo_database: a\n")
    cfg = C.load(str(path), {"mongo_database": "b", "zmr.req_uri": "tcp://127.0.0.1:1"})
    assert cfg.mongo_database == "b"
    assert cfg.zmr.req_uri == "tcp://127.0.0.1:1"


@pytest.mark.parametrize("text, culprit", [
    ("mongo_uri: [1, 2]\n", "key 'mongo_uri'"),
    ("zmr:\n  reduce_count: many\n", "key 'zmr.reduce_count'"),
    ("zmr:\n  reduce_count: 0\n", "key 'zmr.reduce_count'"),
    ("verbose: 3\n", "key 'verbose'"),
    ("web_port: true\n", "key 'web_port'"),
    ("no_such_key: 1\n", "unknown key 'no_such_key'"),
    ("zmr:\n  no_such: 1\n", "unknown key 'zmr.no_such'"),
    ("zmr: 5\n", "key 'zmr'"),
    ("- a\n- b\n", "mapping"),
])
def test_bad_values_name_file_and_key(tmp_path, text, culprit):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(C.ConfigError) as e:
        C.load(str(path))
    assert str(path) in str(e.value) and culprit in str(e.value)


def test_zcmd_exits_2_with_one_line_on_a_yaml_syntax_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("mongo_uri: 'unterminated\nzmr: {\n")
    out = run_zcmd(str(path), "check-config")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "YAML syntax error" in lines[0]


def test_zcmd_exits_2_on_a_missing_file(tmp_path):
    out = run_zcmd(str(tmp_path / "nope.yaml"), "check-config")
    assert out.returncode == 2
    assert out.stderr.strip() == f"zcmd: {tmp_path / 'nope.yaml'}: no such file"


def test_zcmd_exits_2_on_an_unknown_key(tmp_path):
    path = tmp_path / "z.yaml"
    path.write_text("zmr:\n  reduce_cont: 3\n")
    out = run_zcmd(str(path), "check-config")
    assert out.returncode == 2
    assert "unknown key 'zmr.reduce_cont'" in out.stderr and str(path) in out.stderr


def test_check_config_accepts_development_yaml():
    out = run_zcmd("development.yaml", "check-config")
    assert out.returncode == 0, out.stderr
    assert "development.yaml: valid" in out.stdout


def test_check_config_masks_the_passwords(tmp_path):
    path = tmp_path / "z.yaml"
    path.write_text("shared_key: hunter2hunter2\nweb_token: correct-horse-battery\n"
                    "mongo_uri: mongodb://zarkov:s3cret-pw@db1:27017,db2:27017/?tls=true\n")
    out = run_zcmd(str(path), "check-config")
    assert out.returncode == 0, out.stderr
    assert "hunter2" not in out.stdout and "correct-horse" not in out.stdout
    assert "s3cret" not in out.stdout
    assert "shared_key: '***'" in out.stdout and "web_token: '***'" in out.stdout
    assert "mongo_uri: mongodb://zarkov:***@db1:27017,db2:27017/?tls=true" in out.stdout


def test_command_line_overrides_reach_the_config():
    out = run_zcmd("development.yaml", "--mongo-database", "other", "check-config")
    assert "mongo_database: other" in out.stdout


def test_help_lists_every_command_and_one_command_help():
    from zarkov.cli.commands import COMMANDS
    out = run_zcmd(None, "help")
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert f"  {name} " in out.stdout
    one = run_zcmd(None, "help", "aggregate")
    assert one.returncode == 0 and "usage: zcmd aggregate" in one.stdout


def test_unknown_command_exits_2():
    out = run_zcmd(None, "frobnicate")
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr


@pytest.mark.parametrize("text, name", [
    ("journal_min_files: 4\n", "journal_min_files"),
    ("zmr:\n  compress: true\n", "zmr.compress"),
    ("zmr:\n  map_chunks_per_page: 10\n", "zmr.map_chunks_per_page"),
])
def test_a_removed_key_exits_2_saying_to_delete_it(tmp_path, text, name):
    path = tmp_path / "old.yaml"
    path.write_text(text)
    out = run_zcmd(str(path), "check-config")
    assert out.returncode == 2
    line = out.stderr.strip()
    assert "\n" not in line and str(path) in line
    assert f"key '{name}' was removed" in line and "delete it" in line


def test_python_dash_m_zarkov_is_zcmd():
    out = subprocess.run([sys.executable, "-m", "zarkov", "help"], capture_output=True,
                         text=True, timeout=60, env=proc_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "  aggregate " in out.stdout


def test_a_reader_that_goes_away_gets_no_traceback():
    # `zcmd help | head -1`: the reader closes the pipe before zcmd writes.
    p = subprocess.Popen(ZCMD + ["help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=proc_env(), cwd=ROOT)
    p.stdout.close()
    _, err = p.communicate(timeout=60)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


def test_log_file_relative_to_the_config_gets_every_line(procs, config_file, tmp_path):
    # Two event servers: the second is a child process, started from the test's
    # working directory, not the config's; its lines go to the same file.
    path = config_file(log_file="logs/zarkov.log", num_event_servers=2)
    log_path = os.path.join(os.path.dirname(path), "logs", "zarkov.log")
    p = procs.zcmd("eventlog", path, "eventlog")

    def logged() -> str:
        try:
            with open(log_path) as f:
                return f.read()
        except FileNotFoundError:
            return ""
    wait_for(lambda: "event logger: BSON on" in logged(), timeout=60, what="the log file")
    wait_for(lambda: logged().count(": new stream ") == 2, timeout=60,
             what="both event servers' lines")
    pids = {line.split()[2] for line in logged().splitlines() if ": new stream " in line}
    assert len(pids) == 2, logged()
    # logrotate moves the file away: the next lines go to a new one at the same path.
    os.rename(log_path, log_path + ".1")
    procs.kill(p, signal.SIGTERM)
    assert p.returncode == 0
    assert "stopped" in logged()
    assert "event logger: BSON on" not in procs.log("eventlog")  # not on stderr
