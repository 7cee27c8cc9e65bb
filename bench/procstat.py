"""What a benchmark reads of a process from ``/proc``: its CPU time and peak memory,
and which process listens on a port (the database server a URI names)."""
from __future__ import annotations

import os
import re
import subprocess
from typing import Optional


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) that process ``pid`` has used so far (0 once gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """The peak resident memory of process ``pid`` (MB; NaN when unknown)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def listening_pid(port: int) -> Optional[int]:
    """The process listening on TCP ``port`` of this host, when ``ss`` can say."""
    try:
        out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"pid=(\d+)", out)
    return int(found.group(1)) if found else None
