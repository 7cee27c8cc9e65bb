"""A stand-in for the map-reduce router (SPEC §4), for tests of the aggregation engine.

It answers the router protocol from a thread of the test process and runs each job
itself, in one pass, with pymongo: enough to test the aggregation logic apart from
the real cluster (tests of both together use the ``cluster`` fixture).  Jobs run in
the background so that a ``status`` request may see them in progress; ``hold`` keeps
new jobs from finishing until released, for tests that must act while jobs run.
"""
from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections import defaultdict

import bson
import pymongo
import zmq

from zarkov import functions


class FakeRouter:
    """Serve the router protocol at ``uri`` (bind address) against ``mongo_uri``."""

    def __init__(self, bind: str, mongo_uri: str):
        self.bind = bind
        self.client = pymongo.MongoClient(mongo_uri)
        self.jobs: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.hold = threading.Event()
        self.hold.set()  # set = jobs may finish
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._ready = threading.Event()

    def start(self) -> "FakeRouter":
        self._thread.start()
        self._ready.wait(5)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.hold.set()
        self._thread.join(5)
        self.client.close()

    def _serve(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.bind)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(50):
                    continue
                req = bson.decode(sock.recv())
                self.requests.append(req)
                sock.send(bson.encode(self._handle(req)))
        finally:
            sock.close(0)

    def _handle(self, req: dict) -> dict:
        cmd = req.get("$command")
        if cmd == "echo":
            return {"message": req}
        if cmd == "status":
            job = self.jobs.get(req.get("job_id"))
            return {"job_id": req.get("job_id"),
                    "status": dict(job) if job else {"state": "UNKNOWN"}}
        if cmd in ("mapreduce", "xmapreduce", "basic"):
            job_id = uuid.uuid4().hex
            self.jobs[job_id] = {"state": "ready", "docs_read": 0, "elapsed": 0.0}
            threading.Thread(target=self._run, args=(job_id, req), daemon=True).start()
            return {"job_id": job_id, "status": dict(self.jobs[job_id])}
        return {"error": f"unknown command {cmd!r}"}

    def _run(self, job_id: str, req: dict) -> None:
        status = self.jobs[job_id]
        t0 = time.monotonic()
        try:
            status["state"] = "map"
            self.hold.wait()
            if req["$command"] == "basic":
                func = functions.load(req["func_text"], req["func_name"], "func")
                status["result"] = func(*req.get("args", []), **req.get("kwargs", {}))
            else:
                self._mapreduce(req, status)
            status["state"] = "complete"
        except Exception:  # noqa: BLE001 - reported as the job's traceback
            status["traceback"] = traceback.format_exc()
            status["state"] = "error"
        status["elapsed"] = time.monotonic() - t0

    def _mapreduce(self, req: dict, status: dict) -> None:
        db = self.client[req.get("database", "zarkov")]
        query = bson.decode(req["query"]) if req.get("query") else {}
        docs = []
        for name in req.get("input_names", ["event"]):
            docs.extend(db[name].find(query))
        status["docs_read"] = len(docs)
        mapf = functions.load(req["map_text"], req["map_name"], "map")
        reducef = functions.load(req["reduce_text"], req["reduce_name"], "reduce")
        x = req["$command"] == "xmapreduce"
        groups: dict = defaultdict(list)
        for item in mapf(iter(docs)):
            if x:
                groups[(item["c"], _hashable(item["k"]))].append((item["k"], item["v"]))
            else:
                groups[(None, _hashable(item[0]))].append((item[0], item[1]))
        outputs: dict = defaultdict(list)
        for (c, _), pairs in groups.items():
            key = pairs[0][0]
            values = [v for _, v in pairs]
            value = reducef(c, key, values) if x else reducef(key, values)
            outputs[c].append({"_id": key, "value": value})
        status["state"] = "commit"
        if x:
            for c, results in outputs.items():
                self._write(db, req.get("output_prefix", "") + c, results, req, reducef, c)
        else:
            self._write(db, req.get("output_name", "zagg.result"), outputs.get(None, []),
                        req, reducef, None)
        status["docs_written"] = sum(len(r) for r in outputs.values())

    @staticmethod
    def _write(db, name, results, req, reducef, c) -> None:
        mode = req.get("output_type", "replace")
        if mode == "replace":
            # Not atomic (FerretDB renames no dotted names): enough for a stand-in.
            db.drop_collection(name)
            if results:
                db[name].insert_many(results)
            else:
                db.create_collection(name)
            return
        for doc in results:
            old = db[name].find_one({"_id": doc["_id"]})
            if old is not None and mode == "reduce":
                vals = [old["value"], doc["value"]]
                doc["value"] = reducef(c, doc["_id"], vals) if c else reducef(doc["_id"], vals)
            db[name].replace_one({"_id": doc["_id"]}, doc, upsert=True)


def _hashable(key):
    return bson.encode({"k": key}) if isinstance(key, (dict, list)) else key
