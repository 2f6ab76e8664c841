"""The supervisor's local HTTP endpoint: /metrics, /status, /endpoints, /sd, /healthz and
/openapi.json, and the two routes that change state, POST /checkpoint and POST /restore.

A `ThreadingHTTPServer` in a daemon thread, so a slow scrape never stalls the main loop
(which must keep pinging the watchdog). This module is the transport only: /metrics,
/status, /healthz and /openapi.json read the registry and a status snapshot the main loop
replaces whole on every tick; every other route is a handler of `supervisor.handlers`,
run on the main loop through `run_coroutine_threadsafe` (the one way into the loop). The
POST routes pass the gate first (`contract.gate`: loopback unless
`workers.control_from_network`, the bearer token). Loopback by default.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Coroutine
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dynamo_vllm.contract.gate import MAX_BODY, BadRequest, parse_body, refusal
from dynamo_vllm.contract.openapi import supervisor_document
from dynamo_vllm.contract.protocol import Route
from dynamo_vllm.supervisor.handlers import Routes, Unavailable

log = logging.getLogger(__name__)


# How long a GET handler on the loop may take (etcd calls are bounded by less).
READ_TIMEOUT_S = 10.0


class StatusServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 snapshot: Callable[[], dict[str, Any]], routes: Routes,
                 loop: asyncio.AbstractEventLoop, control_timeout: float = 60.0,
                 control_from_network: bool = False, token: str | None = None):
        self.registry = registry
        self.token = token
        self.routes = routes
        self.loop = loop
        self.control_timeout = control_timeout
        self.control_from_network = control_from_network
        self.snapshot = snapshot
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "dynamo-vllm"

            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                try:
                    if path == Route.METRICS:
                        self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                    elif path == Route.STATUS:
                        self._send_json(200, server.snapshot())
                    elif path == Route.ENDPOINTS:
                        self._send_json(200, server.on_loop(server.routes.endpoints(),
                                                            READ_TIMEOUT_S))
                    elif path == Route.SERVICE_DISCOVERY:
                        # Prometheus' HTTP service discovery format (http_sd_configs);
                        # ?scope=fleet: every supervisor that publishes in etcd.
                        fleet = "scope=fleet" in query.split("&")
                        self._send_json(200, server.on_loop(server.routes.scrape_targets(fleet),
                                                            READ_TIMEOUT_S))
                    elif path == Route.OPENAPI:
                        self._send_json(200, supervisor_document())
                    elif path == Route.HEALTHZ:
                        status = server.snapshot()
                        self._send_json(200 if status.get("ready") else 503,
                                        {"ready": status.get("ready"),
                                         "status": status.get("status")})
                    else:
                        self._send_json(404, {"error": f"no route {path}; try /metrics, "
                                                       "/status, /endpoints, /sd, /healthz or "
                                                       "/openapi.json"})
                except Unavailable as exc:
                    self._send_json(503, {"error": str(exc)})
                except TimeoutError:
                    self._send_json(503, {"error": "no answer from the supervisor's loop in "
                                                   "time"})
                except Exception as exc:
                    log.exception("error answering %s", path)
                    self._send_json(500, {"error": f"{type(exc).__name__}: {exc}"})

            def do_POST(self) -> None:
                path = self.path.partition("?")[0]
                if path not in (Route.CHECKPOINT, Route.RESTORE):
                    self._send_json(405, {"error": f"{path} only reads (GET); POST goes to "
                                                   f"{Route.CHECKPOINT} or {Route.RESTORE}"})
                    return
                refused = refusal(self.client_address[0], self.headers.get("Authorization"),
                                  from_network=server.control_from_network, token=server.token)
                if refused is not None:
                    self._send_json(refused[0], {"error": refused[1]})
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    if not 0 <= length <= MAX_BODY:
                        raise BadRequest(f"the body must be at most {MAX_BODY} bytes")
                    body = parse_body(self.rfile.read(length))
                    code, answer = server.on_loop(server.routes.control(path, body),
                                                  server.control_timeout)
                except BadRequest as exc:
                    code, answer = 400, {"error": str(exc)}
                except ValueError:
                    code, answer = 400, {"error": "Content-Length is not a number"}
                except TimeoutError:
                    code, answer = 503, {"error": "no answer from the supervisor's loop in time"}
                except Exception as exc:
                    log.exception("error answering POST %s", path)
                    code, answer = 500, {"error": f"{type(exc).__name__}: {exc}"}
                self._send_json(code, answer)

            def _send_json(self, code: int, body: Any) -> None:
                self._send(code, json.dumps(body).encode(), "application/json")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s " + format, self.address_string(), *args)

        ThreadingHTTPServer.allow_reuse_address = True
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="status-http",
                                       daemon=True)

    def on_loop(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        """Run a handler on the supervisor's loop and wait for its answer (TimeoutError)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()
            raise

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
