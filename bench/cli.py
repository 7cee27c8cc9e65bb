#!/usr/bin/env python3
"""Benchmark how fast zcmd answers: ``zcmd help`` and ``zcmd <command> --help``.

Each command line is started ``--runs`` times as a new process (what a user or a
shell completion waits for) and the median wall time is printed, beside the
baseline measured in the same run: an interpreter that starts and exits (``python
-c pass``), which no command can beat.  Target: every median <= 0.3 s.  No database
is needed.  Usage: ``python bench/cli.py [--runs 15]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZCMD = [sys.executable, os.path.join(ROOT, "scripts", "zcmd")]
TARGET = 0.3


def median_seconds(argv: list[str], runs: int) -> float:
    """The median wall time of ``runs`` starts of ``argv`` (its output discarded)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=env, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=15)
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    from zarkov.cli.commands import COMMANDS

    base = median_seconds([sys.executable, "-c", "pass"], args.runs)
    print(f"bench/cli.py: medians of {args.runs} starts, {os.cpu_count()} cores")
    print(f"  {'python -c pass (baseline)':<34} {base:6.3f} s")
    worst = 0.0
    for line in [["help"]] + [[name, "--help"] for name in sorted(COMMANDS)]:
        t = median_seconds(ZCMD + line, args.runs)
        worst = max(worst, t)
        print(f"  {'zcmd ' + ' '.join(line):<34} {t:6.3f} s  ({t / base:.1f}x the baseline)")
    print(f"slowest: {worst:.3f} s (target <= {TARGET} s): "
          f"{'held' if worst <= TARGET else 'NOT held'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
