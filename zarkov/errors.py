"""The one error model of Zarkov.

Every error Zarkov raises on purpose is a :class:`ZarkovError`: a one-line message
that names the culprit (file, key, collection, function, parameter), optionally the
traceback of the remote code that failed (a worker's, say), and the exit status a
command ends with when it is not handled (:attr:`ZarkovError.exit_code`).  The CLI
turns one into a line on stderr and that status in one place
(:func:`zarkov.cli.main.main`); services log it and go on.

Exit statuses, for every ``zcmd`` command:

==================  ========================================================
:data:`EXIT_OK`     done
:data:`EXIT_FAILED` the command ran and failed (a run rolled back, a router that
                    does not answer, a socket that cannot be bound)
:data:`EXIT_USAGE`  bad input: a config file or key, an argument, a definition
:data:`EXIT_BUSY`   another process holds what was asked for (an AggDef being
                    run), or a stop left work behind (events still journaled)
:data:`EXIT_LOOP_DIED` a loop of the process died (its supervisor restarts it)
:data:`EXIT_RECYCLE` a child process asks its supervisor for a fresh one (a worker
                   that served its quota of tasks)
==================  ========================================================
"""
from __future__ import annotations

from typing import Optional

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUSY = 3
EXIT_LOOP_DIED = 70      # EX_SOFTWARE (sysexits.h): an internal error
EXIT_RECYCLE = 75        # EX_TEMPFAIL: done for now, start me again
EXIT_INTERRUPTED = 130   # Ctrl-C


class ZarkovError(Exception):
    """An error with a one-line message; ``traceback``: the remote code's, if any."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str = "", traceback: Optional[str] = None):
        super().__init__(message)
        self.traceback = traceback


class BadInput(ZarkovError):
    """What the user gave cannot be used: a config, an argument, a definition."""

    exit_code = EXIT_USAGE


class ConfigError(BadInput):
    """A configuration file or value that cannot be used; the message names it."""


class Busy(ZarkovError):
    """Another process holds what was asked for."""

    exit_code = EXIT_BUSY


class JobFailed(ZarkovError):
    """A map-reduce job reported an error, or the router lost it or stopped
    answering; ``traceback`` holds the worker's when there is one."""


class JobHalted(ZarkovError):
    """A job cannot go on (inside the engine that runs it: the router's or Dask's);
    ``traceback`` says why and the job ends in state ``error``."""

    def __init__(self, traceback: str):
        super().__init__(traceback.strip().splitlines()[-1] if traceback.strip()
                         else "job halted", traceback)
