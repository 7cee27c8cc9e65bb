"""zcmd script <file> [args]: run a Python file with the Zarkov model configured.

The file runs as ``__main__`` with ``sys.argv`` = [file, args...]; ``zarkov.model``
is bound to the configured database, so it can register AggDefs (README, "Using it").
"""
from __future__ import annotations

import argparse
import runpy
import sys

from zarkov.config import Config
from zarkov.errors import BadInput


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="the Python file to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")


def run(config: Config, args: argparse.Namespace) -> int:
    from zarkov import model as M
    M.configure(config)
    saved = sys.argv
    sys.argv = [args.file, *args.args]
    try:
        runpy.run_path(args.file, run_name="__main__")
    except FileNotFoundError:
        raise BadInput(f"{args.file}: no such file") from None
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
        # Objects created but not flushed by the script are flushed, as a shell user
        # would expect after `M.AggDef(...)`: an explicit flush() is the norm anyway.
        M.orm_session.flush_all()
    return 0
