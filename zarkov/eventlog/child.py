"""One event-server process behind the event logger's proxy (``num_event_servers`` > 1).

Started and kept running by the event logger (:class:`zarkov.runtime.children.
Children`, which hands it the config); it connects to the proxy's ``ipc://``
sockets, journals and commits its share of the events, tells the parent of its
commits, and stops cleanly on SIGTERM or when its parent is gone.  gevent must patch
before anything else is imported, hence a module of its own.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from zarkov import runtime  # noqa: E402
from zarkov.errors import ZarkovError  # noqa: E402
from zarkov.eventlog import notify  # noqa: E402
from zarkov.eventlog.server import EventServer  # noqa: E402
from zarkov.runtime import children  # noqa: E402


class _Child:
    """The child's components: its event server and its news to the parent."""

    def __init__(self, args: argparse.Namespace):
        config = children.child_config("<event logger>")
        runtime.setup_logging(config)
        self.index = children.child_index()
        self.server = EventServer(config, self.index, args.count, args.bson, args.json,
                                  bind=False)
        self.news = notify.Forwarder(args.notify)

    def start(self) -> "_Child":
        self.server.start()
        return self

    def stop(self, timeout: float = 10.0) -> bool:
        ok = self.server.stop(timeout)
        self.news.close()
        return ok


def main(argv: list[str]) -> int:
    """A server process behind the proxy (started by EventLogger, not by hand)."""
    p = argparse.ArgumentParser()
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--bson", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--notify", required=True, help="where to report commits (the parent)")
    args = p.parse_args(argv)
    # Why: a parent killed with SIGKILL cannot stop us; journal what we hold and exit.
    children.watch_parent(lambda: os.kill(os.getpid(), signal.SIGTERM))
    try:
        return runtime.run([lambda: _Child(args)], f"event server {children.child_index()}")
    except ZarkovError as e:
        logging.getLogger("zarkov.eventlog").error("event server %d: %s",
                                                   children.child_index(), e)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
