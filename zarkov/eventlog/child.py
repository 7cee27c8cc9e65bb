"""Entry point of one event-server process behind the event logger's proxy.

Started by :class:`zarkov.eventlog.server.EventLogger` when ``num_event_servers`` > 1;
gevent must patch before anything else is imported, hence this separate module.
"""
from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from zarkov.eventlog.server import child_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
