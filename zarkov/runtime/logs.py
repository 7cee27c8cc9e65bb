"""Logging of every Zarkov process: one format, the config's level and file.

``log_file`` ``-`` (the default) is stderr; a path (relative to the config file's
directory, like the key files) is appended to, and reopened when something else
renamed or removed it (logrotate's default ``create`` mode), so that rotating the
logs needs no restart and no signal.  ``verbose`` logs at DEBUG, else INFO.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import Any, Optional

FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"

#: The handler this module installed (replaced, not added to, on a second call).
_installed: Optional[logging.Handler] = None


def log_path(config: Any) -> Optional[str]:
    """The file ``config.log_file`` names (None: stderr)."""
    name = getattr(config, "log_file", "-") or "-"
    if name == "-":
        return None
    # Loading the file made a relative path relative to it (zarkov.config).
    return os.path.abspath(os.path.expanduser(name))


def setup_logging(config: Any = None, verbose: Optional[bool] = None) -> None:
    """Log at the level and to the file of ``config`` (stderr without one).

    Safe to call again: the handler it installed is replaced (a child process that
    has read its config, a command that has loaded its file).
    """
    global _installed
    if verbose is None:
        verbose = bool(getattr(config, "verbose", False))
    path = log_path(config) if config is not None else None
    handler: logging.Handler
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        handler = logging.handlers.WatchedFileHandler(path)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
        _installed.close()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    _installed = handler
