"""zcmd keys: make CURVE key pairs and keep the directory of authorised client keys.

``init <dir>`` makes the servers' key pair and an empty authorised directory and
prints the ``security`` section to add; ``new <name>`` makes a client key pair;
``authorize <file>`` adds a client's public key; ``revoke <name>`` removes it (the
servers drop it within a second, no restart); ``list`` shows who is authorised.
The authorised directory is ``security.authorized_keys`` unless ``--dir`` says.
"""
import argparse
import os
import sys

from zarkov import keyfiles as K
from zarkov.config import Config
from zarkov.errors import EXIT_FAILED, EXIT_USAGE, BadInput


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("init", help="make the servers' key pair and an authorised directory")
    p.add_argument("dir", help="directory for server.key, server.key_secret and authorized/")
    p = sub.add_parser("new", help="make a key pair <dir>/<name>.key and .key_secret")
    p.add_argument("name", help="e.g. worker1 or webapp")
    p.add_argument("--dir", default=".", help="where to write it (default: here)")
    p = sub.add_parser("authorize", help="authorise a client's public key file")
    p.add_argument("file", help="the client's <name>.key (a .key_secret works too; only "
                                "its public key is copied)")
    p.add_argument("--name", help="file name in the directory (default: the file's)")
    p.add_argument("--dir", help="authorised directory (default: security.authorized_keys)")
    p = sub.add_parser("revoke", help="remove <name>.key from the authorised directory")
    p.add_argument("name")
    p.add_argument("--dir", help="authorised directory (default: security.authorized_keys)")
    p = sub.add_parser("list", help="list the authorised keys")
    p.add_argument("--dir", help="authorised directory (default: security.authorized_keys)")


class _Usage(BadInput):
    """A missing argument or setting: exit 2."""


def _authorized_dir(config: Config, args: argparse.Namespace) -> str:
    directory = args.dir or config.security.authorized_keys
    if directory is None:
        raise _Usage(f"no authorised directory: set security.authorized_keys in "
                     f"{config.source} or give --dir")
    return directory


def _init(args: argparse.Namespace) -> None:
    directory = os.path.abspath(args.dir)
    public, secret = K.new_key_pair(directory, "server")
    authorized = os.path.join(directory, "authorized")
    os.makedirs(authorized, mode=0o755, exist_ok=True)
    print(f"made {secret} (keep it on the server hosts only) and {public}\n"
          f"authorised directory: {authorized}\n\n"
          f"# on the hosts that run the router, the event logger or serve:\n"
          f"security:\n  server_key: {secret}\n  authorized_keys: {authorized}\n\n"
          f"# on each other host: 'zcmd keys new <name>' there, copy {public} to it,\n"
          f"# 'zcmd keys authorize <name>.key' here, and in its config:\n"
          f"security:\n  server_public_key: /path/to/server.key\n"
          f"  client_key: /path/to/<name>.key_secret")


def run(config: Config, args: argparse.Namespace) -> int:
    try:
        if args.action == "init":
            _init(args)
        elif args.action == "new":
            public, secret = K.new_key_pair(args.dir, args.name)
            print(f"made {secret} (secret: keep it on this host) and {public} "
                  f"(public: 'zcmd keys authorize' it on the servers)")
        elif args.action == "authorize":
            path = K.authorize(args.file, _authorized_dir(config, args), args.name)
            print(f"authorised {K.read_key_file(path)[0].decode()} as {path}")
        elif args.action == "revoke":
            print(f"revoked: removed {K.revoke(_authorized_dir(config, args), args.name)}")
        else:
            directory = _authorized_dir(config, args)
            for name, key in K.authorized_keys(directory).items():
                print(f"{name[:-len(K.PUBLIC_SUFFIX)]:<24} {key.decode()}")
            for path in K.invalid_files(directory):
                print(f"{os.path.basename(path)}: not a valid key file (ignored)",
                      file=sys.stderr)
    except _Usage as e:  # why here, not zcmd's handler: the line names the action
        print(f"zcmd keys {args.action}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError) as e:
        print(f"zcmd keys {args.action}: {e}", file=sys.stderr)
        return EXIT_FAILED
    return 0
