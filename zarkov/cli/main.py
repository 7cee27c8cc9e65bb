"""zcmd: parse the arguments, build the config, run one command; errors to exit codes.

The commands are in :mod:`zarkov.cli.commands` (the registry and one module each).
``zcmd help`` answers from the registry without importing any engine; a command's
process is patched by gevent only when the command needs it (the services), before
anything else is imported.  Every :class:`~zarkov.errors.ZarkovError` a command lets
through becomes one line on stderr (``zcmd: …`` for the config, ``zcmd <command>: …``
otherwise; a remote traceback after it) and its exit status, here and nowhere else.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Optional, TextIO

from zarkov.cli.commands import COMMANDS
from zarkov.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zcmd", add_help=False,
        description="Zarkov: event logger, map-reduce and aggregation service.")
    p.add_argument("-y", "--yaml", metavar="FILE", help="YAML configuration file")
    p.add_argument("--mongo-uri", help="override mongo_uri")
    p.add_argument("--mongo-database", help="override mongo_database")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.add_argument("-h", "--help", action="store_true", help="show help and exit")
    p.add_argument("command", nargs="?", help="the command to run (see 'zcmd help')")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _module(name: str) -> Any:
    return importlib.import_module(f"zarkov.cli.commands.{COMMANDS[name].module}")


def command_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of one command, filled by its module."""
    p = argparse.ArgumentParser(prog=f"zcmd {name}", description=COMMANDS[name].summary)
    _module(name).add_arguments(p)
    return p


def print_help(command: Optional[str] = None, out: TextIO = sys.stdout) -> int:
    """Print the list of commands, or one command's help; return an exit status."""
    if command:
        if command not in COMMANDS:
            print(f"zcmd: unknown command '{command}'; try 'zcmd help'", file=sys.stderr)
            return EXIT_USAGE
        command_parser(command).print_help(out)
        return EXIT_OK
    out.write("usage: zcmd [-y FILE] [--mongo-uri URI] [--mongo-database NAME] [-v] "
              "<command> [args]\n\ncommands:\n")
    for name in sorted(COMMANDS):
        out.write(f"  {name:<14} {COMMANDS[name].summary}\n")
    out.write("\n'zcmd help <command>' shows one command's arguments.\n")
    return EXIT_OK


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``zcmd``; returns the exit status."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (``zcmd help | head``): what it did not read is not
        # an error.  Point stdout at nothing so that flushing at exit raises no more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _main(argv: Optional[list[str]]) -> int:
    opts = _parser().parse_args(argv)
    if opts.help or not opts.command or opts.command == "help":
        return print_help(opts.args[0] if opts.command == "help" and opts.args else None)
    if opts.command not in COMMANDS:
        print(f"zcmd: unknown command '{opts.command}'; try 'zcmd help'", file=sys.stderr)
        return EXIT_USAGE
    # Parsed before gevent patches the process: `zcmd serve --help` need not wait for it.
    args = command_parser(opts.command).parse_args(opts.args)
    if COMMANDS[opts.command].gevent:
        from gevent import monkey
        monkey.patch_all()
    return _run(opts, args)


def _run(opts: argparse.Namespace, args: argparse.Namespace) -> int:
    from zarkov import config as C
    from zarkov import runtime
    from zarkov.errors import ConfigError, ZarkovError
    from zarkov.runtime import loops

    overrides: dict[str, Any] = {}
    if opts.mongo_uri:
        overrides["mongo_uri"] = opts.mongo_uri
    if opts.mongo_database:
        overrides["mongo_database"] = opts.mongo_database
    if opts.verbose:
        overrides["verbose"] = True
    try:
        config = C.load(opts.yaml, overrides)
        runtime.setup_logging(config)
        code = int(_module(opts.command).run(config, args) or 0)
    except ZarkovError as e:
        where = "zcmd" if isinstance(e, ConfigError) else f"zcmd {opts.command}"
        print(f"{where}: {e}", file=sys.stderr)
        # A one-line "traceback" (a lost Dask scheduler, say) is the message already.
        if e.traceback and e.traceback.strip() not in str(e):
            print(e.traceback.rstrip(), file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    # A loop that died makes the whole command fail, whatever it returned, so that
    # its supervisor starts it again (see zarkov.runtime.loops).
    return loops.exit_status(code)


if __name__ == "__main__":
    sys.exit(main())
