"""What the MongoDB server can do, and the one set of ways Zarkov writes with it.

Zarkov is written to what MongoDB >= 4.4 does.  The servers bundled for development
and tests (FerretDB 1.24 and mongo-java-server, see README "Servers") lack a few
things; every difference between servers lives here and nowhere else:

* :func:`capabilities` answers what a server and database can do, probed once per
  client, server and database and then kept for the life of the client.  Probes are
  harmless (two scratch collections and a rename); what no harmless probe can decide
  (FerretDB wedges on large update commands) is known by the server's name.
* :class:`Writes` holds the three write strategies built on those answers, used by
  the map-reduce router's commit (:mod:`zarkov.zmr.job`), the aggregation's apply step
  (:mod:`zarkov.aggregation.apply`) and rotate (:mod:`zarkov.eventlog.rotate`) alike:

  - **replace a collection** (:meth:`Writes.replace`, :meth:`Writes.replace_from`):
    build the new content aside and rename it over the target in one step; where the
    server cannot rename over a collection, write every new document over the old
    one and then delete the rest, so that readers never find the target empty;
  - **overwrite documents** (:meth:`Writes.overwrite`): ``ReplaceOne`` upserts in
    bulk, atomic per document; where update commands are costly and can wedge the
    server, delete then insert each batch;
  - **move documents** (:meth:`Writes.move`): rename the collection; where the server
    refuses, insert the documents into the target and delete them from the source,
    in batches, resumable after a crash.

Each strategy returns the name of the path it took (``RENAMED`` …), which the router
puts in a job's status and the aggregation in its result, so that tests can assert
which path ran on which server.
"""
from zarkov.storage.capabilities import (
                                        BATCH,
                                        FERRETDB_UPDATE_BATCH,
                                        ID_IN,
                                        ID_ONE,
                                        ID_RANGE,
                                        PROBE_PREFIX,
                                        Capabilities,
                                        Identity,
                                        capabilities,
                                        identify,
)
from zarkov.storage.reads import Reads, approx_count, reads
from zarkov.storage.writes import (
                                        DELETE_INSERT,
                                        DUPLICATE_KEY,
                                        MOVED_BY_RENAME,
                                        MOVED_DOCUMENTS,
                                        RENAMED,
                                        REPLACED_IN_PLACE,
                                        UPSERTS,
                                        Writes,
                                        copy_indexes,
                                        drop_quietly,
                                        raw_batches,
                                        writes,
)

__all__ = ["BATCH", "FERRETDB_UPDATE_BATCH", "ID_IN", "ID_ONE", "ID_RANGE", "PROBE_PREFIX",
           "Capabilities", "Identity", "capabilities", "identify", "Reads", "approx_count",
           "reads", "DELETE_INSERT", "DUPLICATE_KEY", "MOVED_BY_RENAME", "MOVED_DOCUMENTS",
           "RENAMED", "REPLACED_IN_PLACE", "UPSERTS", "Writes", "copy_indexes",
           "drop_quietly", "raw_batches", "writes"]
