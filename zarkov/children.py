"""Starting Zarkov's own child processes (worker pool, extra event servers)."""
from __future__ import annotations

import os

import zarkov

# The directory that holds the zarkov package, whether installed or a checkout.
_TOP = os.path.dirname(os.path.dirname(os.path.abspath(zarkov.__file__)))


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment, with zarkov importable from where this process
    imported it (children run ``python -m zarkov...`` from any working directory)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = _TOP + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env
