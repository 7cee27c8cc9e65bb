"""zcmd shell: an interactive Python with the Zarkov model loaded.

IPython when installed, the standard console otherwise.  The namespace holds
``M`` (zarkov.model, configured), ``ZM`` (the map-reduce client), ``session`` (Ming's
``ming.odm.session``, as in ``session(M.AggDef).flush()``), ``config`` and ``db``.
"""
from __future__ import annotations

import argparse
import code

from zarkov.config import Config

BANNER = """Zarkov shell: {db} on {uri}
  M        zarkov.model (M.AggDef, M.doc_session, M.orm_session)
  ZM       the map-reduce client (zarkov.zmr.jobclient)
  session  ming.odm.session: session(M.AggDef).flush()
  config   the configuration;  db  the pymongo Database
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--command", help="run this code instead of an interactive "
                                                "session (for scripts and tests)")


def namespace(config: Config) -> dict:
    """The names a shell session starts with."""
    from ming.odm import session

    from zarkov import model as M
    from zarkov.zmr import jobclient as ZM
    M.configure(config)
    return {"M": M, "ZM": ZM, "session": session, "config": config, "db": M.db()}


def run(config: Config, args: argparse.Namespace) -> int:
    from zarkov import model as M
    ns = namespace(config)
    if args.command:
        exec(compile(args.command, "<zcmd shell -c>", "exec"), ns)
        M.orm_session.flush_all()
        return 0
    banner = BANNER.format(db=config.mongo_database, uri=config.mongo_uri)
    try:
        from IPython import start_ipython
    except ImportError:
        code.interact(banner=banner, local=ns)
    else:
        print(banner)
        start_ipython(argv=[], user_ns=ns)
    M.orm_session.flush_all()
    return 0
