"""zcmd: patch for gevent, parse options, load the config, run one command.

Commands live one per module in :mod:`zarkov.cli.commands`; each module defines
``SUMMARY`` (one line), ``add_arguments(parser)`` and ``run(config, args) -> int``.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (gevent must patch before anything else is imported)
import importlib  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from zarkov import config as C  # noqa: E402
from zarkov import supervise  # noqa: E402
from zarkov.cli.commands import COMMANDS  # noqa: E402


def _command_module(name: str):
    return importlib.import_module(f"zarkov.cli.commands.{COMMANDS[name]}")


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


def command_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of one command, filled by its module."""
    mod = _command_module(name)
    p = argparse.ArgumentParser(prog=f"zcmd {name}", description=mod.SUMMARY)
    mod.add_arguments(p)
    return p


def print_help(command: str | None = None, out=sys.stdout) -> int:
    """Print the list of commands, or one command's help; return an exit status."""
    if command:
        if command not in COMMANDS:
            print(f"zcmd: unknown command '{command}'; try 'zcmd help'", file=sys.stderr)
            return 2
        command_parser(command).print_help(out)
        return 0
    out.write("usage: zcmd [-y FILE] [--mongo-uri URI] [--mongo-database NAME] [-v] "
              "<command> [args]\n\ncommands:\n")
    for name in sorted(COMMANDS):
        out.write(f"  {name:<14} {_command_module(name).SUMMARY}\n")
    out.write("\n'zcmd help <command>' shows one command's arguments.\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zcmd``; returns the exit status."""
    opts = _parser().parse_args(argv)
    if opts.help or not opts.command or opts.command == "help":
        return print_help(opts.args[0] if opts.command == "help" and opts.args else None)
    if opts.command not in COMMANDS:
        print(f"zcmd: unknown command '{opts.command}'; try 'zcmd help'", file=sys.stderr)
        return 2
    args = command_parser(opts.command).parse_args(opts.args)
    overrides = {}
    if opts.mongo_uri:
        overrides["mongo_uri"] = opts.mongo_uri
    if opts.mongo_database:
        overrides["mongo_database"] = opts.mongo_database
    if opts.verbose:
        overrides["verbose"] = True
    try:
        config = C.load(opts.yaml, overrides)
    except C.ConfigError as e:
        print(f"zcmd: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if config.verbose else logging.INFO,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    try:
        code = int(_command_module(opts.command).run(config, args) or 0)
    except C.ConfigError as e:  # found when starting: e.g. a bind beyond loopback
        print(f"zcmd: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        code = 130
    # A loop that died makes the whole command fail, whatever it returned, so that
    # its supervisor starts it again (see zarkov.supervise).
    return supervise.exit_status(code)


if __name__ == "__main__":
    sys.exit(main())
