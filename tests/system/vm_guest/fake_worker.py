"""Stands in for a vLLM worker in the VM (workers.python runs it): answers /health.

Under TCG a real engine takes 2-3 minutes to start; the VM tier proves the unit's
semantics (READY, watchdog, restarts, exit codes, packaging) and the nspawn tier runs the
real engine. Called as `python -m dynamo_vllm.agent --config FILE --index I`.

With FAKE_WORKER_SERVE_ONCE=PATH only the first life serves (it creates PATH); every later
one says "loading" for ever: an instance that cannot get back to serving, for the watchdog.
"""

import json
import os
import sys
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = sys.argv[1:]
with open(args[args.index("--config") + 1], "rb") as fh:
    config = tomllib.load(fh)
index = int(args[args.index("--index") + 1])
port = config["workers"]["base_port"] + index


once = os.environ.get("FAKE_WORKER_SERVE_ONCE")
serving = True
if once:
    serving = not os.path.exists(once)
    open(once, "a").close()


class Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        state = "serving" if serving else "loading"
        body = json.dumps({"state": state, "reason": "fake worker", "pid": os.getpid()})
        self.send_response(200 if serving else 503)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        return None


print(f"fake worker {index} on port {port}", flush=True)
ThreadingHTTPServer(("127.0.0.1", port), Health).serve_forever()
