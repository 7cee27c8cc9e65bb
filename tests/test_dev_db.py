"""scripts/dev-db's errors when what it needs is missing (no server is started)."""
from __future__ import annotations

import os
import shutil
import subprocess

from tests.support import ROOT

DEV_DB = os.path.join(ROOT, "scripts", "dev-db")


def dev_db(tmp_path, tools, *args):
    """Run dev-db with a PATH holding only ``tools`` (links to the real ones)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        link = bin_dir / tool
        if not link.exists():
            link.symlink_to(shutil.which(tool))
    return subprocess.run([shutil.which("bash"), DEV_DB, *args], capture_output=True,
                          text=True, timeout=60, env={"PATH": str(bin_dir)})


def test_java_server_without_java_or_maven_says_what_is_missing(tmp_path):
    res = dev_db(tmp_path, ["dirname"], "start", "java")
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        "dev-db: Java 17 or later is needed for the java server (tools/java-server) "
        "and 'java' was not found on PATH"]
    res = dev_db(tmp_path, ["dirname", "java", "sed", "head", "awk"], "build", "java")
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        "dev-db: Maven is needed to build the java server (tools/java-server) and 'mvn' "
        "was not found on PATH"]


def test_unknown_server_name(tmp_path):
    res = dev_db(tmp_path, ["dirname"], "start", "mongod")
    assert res.returncode == 2
    assert res.stderr.splitlines() == ["dev-db: unknown server 'mongod' (ferretdb or java)"]
