"""The supervisor's local HTTP endpoint: /metrics, /status, /endpoints, /sd, /healthz and
/openapi.json, and the two routes that change state, POST /checkpoint and POST /restore.

An asyncio server on an event loop of its own, in a daemon thread: a slow scrape never
stalls the main loop (which must keep pinging the watchdog), and an idle connection costs a
socket, not a thread. Hostile clients are bounded: a request head must arrive within
HEAD_TIMEOUT_S and a body within BODY_TIMEOUT_S, at most MAX_CONNECTIONS are open, and at
the cap the oldest connection that has not sent a whole request is closed to make room, so
2,000 idle connections neither exhaust the supervisor's file descriptors nor keep
Prometheus or the CLI out.

This module is the transport only: /metrics renders `scrape` (metrics.Scrape: the body's
parts, gzipped by exposition.GzipBody when the client takes gzip), /status,
/healthz and /openapi.json read a status snapshot the main loop replaces whole on every
tick; every other route is a handler of `supervisor.handlers`, run on the main loop through
`run_coroutine_threadsafe` (the one way into the loop). The POST routes pass the gate first
(`contract.gate`: the socket's peer on loopback unless `workers.control_from_network`, the
bearer token). Loopback by default.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import socket
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from dynamo_vllm.contract.gate import (
    MAX_BODY,
    BadRequest,
    TokenFile,
    is_loopback,
    parse_body,
    refusal,
)
from dynamo_vllm.contract.openapi import supervisor_document
from dynamo_vllm.contract.protocol import Route
from dynamo_vllm.supervisor.exposition import GzipBody
from dynamo_vllm.supervisor.handlers import Routes, Unavailable

log = logging.getLogger(__name__)

# How long a GET handler on the loop may take (etcd calls are bounded by less).
READ_TIMEOUT_S = 10.0
# A client has this long to send its request head, then its body; an answer this long to be
# taken. Prometheus and the CLI send a whole request at once.
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 30.0
MAX_HEAD = 16 * 1024
MAX_CONNECTIONS = 256
# Answers smaller than this are not worth compressing.
GZIP_MIN = 1024

# (status, body, content type, content encoding)
Answer = tuple[int, bytes, str, str]


def _json(code: int, body: Any) -> Answer:
    return code, json.dumps(body).encode(), "application/json", ""


class Request:
    def __init__(self, head: bytes):
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise BadRequest(f"not an HTTP request line: {lines[0][:80]!r}")
        self.method, target, _ = parts
        self.path, _, self.query = target.partition("?")
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, sep, value = line.partition(":")
                if not sep:
                    raise BadRequest(f"not a header line: {line[:80]!r}")
                self.headers[name.strip().lower()] = value.strip()

    def content_length(self) -> int:
        try:
            length = int(self.headers.get("content-length") or 0)
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
        if not 0 <= length <= MAX_BODY:
            raise BadRequest(f"the body must be at most {MAX_BODY} bytes")
        return length


class StatusServer:
    def __init__(self, host: str, port: int, scrape: Callable[[], Sequence[bytes]],
                 snapshot: Callable[[], dict[str, Any]], routes: Routes,
                 loop: asyncio.AbstractEventLoop, control_timeout: float = 60.0,
                 control_from_network: bool = False, token: TokenFile | None = None):
        self.scrape = scrape
        self.gzip = GzipBody()
        self.token = token
        self.routes = routes
        self.loop = loop
        self.control_timeout = control_timeout
        self.control_from_network = control_from_network
        self.snapshot = snapshot
        # Bound here, so a port in use is a start-up error, not a thread's.
        self.sock = socket.create_server(
            (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
            dualstack_ipv6=host == "::", backlog=1024)
        self.sock.setblocking(False)
        self.own_loop = asyncio.new_event_loop()
        # Scrapes render here, off both loops: one of many busy workers takes a while.
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2,
                                                          thread_name_prefix="status-scrape")
        # Connections that have not sent a whole request yet, oldest first (dicts keep order).
        self.waiting: dict[asyncio.StreamWriter, None] = {}
        self.open = 0
        self.server: asyncio.Server | None = None
        self.thread = threading.Thread(target=self._serve, name="status-http", daemon=True)
        self._started = threading.Event()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self) -> None:
        self.thread.start()
        self._started.wait(10)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.own_loop.call_soon_threadsafe(self.own_loop.stop)
            self.thread.join(timeout=5)
        elif not self.own_loop.is_closed():
            self.own_loop.close()  # never started
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.sock.close()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.own_loop)
        self.server = self.own_loop.run_until_complete(
            asyncio.start_server(self._connection, sock=self.sock, limit=MAX_HEAD))
        self._started.set()
        try:
            self.own_loop.run_forever()
        finally:
            self.server.close()
            for writer in list(self.waiting):
                writer.transport.abort()
            # Connections still being answered end here, then the loop itself.
            pending = asyncio.all_tasks(self.own_loop)
            for task in pending:
                task.cancel()
            self.own_loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.own_loop.close()

    # ------------------------------------------------------------ connections

    def _make_room(self) -> bool:
        """At the cap: close the oldest connection still waiting for its request. False
        when every open connection is being answered."""
        if self.open < MAX_CONNECTIONS:
            return True
        if not self.waiting:
            return False
        oldest = next(iter(self.waiting))
        del self.waiting[oldest]
        oldest.transport.abort()
        return True

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if not self._make_room():
            writer.transport.abort()
            return
        self.open += 1
        self.waiting[writer] = None
        try:
            answer = await self._read_and_answer(reader, writer)
            if answer is not None:
                await asyncio.wait_for(self._write(writer, *answer), WRITE_TIMEOUT_S)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a client that went quiet or away: nothing to answer
        except Exception:
            log.exception("error on a status connection")
        finally:
            self.open -= 1
            self.waiting.pop(writer, None)
            writer.close()

    async def _read_and_answer(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> Answer | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            return _json(431, {"error": f"the request head is over {MAX_HEAD} bytes"})
        self.waiting.pop(writer, None)
        try:
            request = Request(head)
            body = b""
            if request.method == "POST":
                body = await asyncio.wait_for(reader.readexactly(request.content_length()),
                                              BODY_TIMEOUT_S)
        except BadRequest as exc:
            return _json(400, {"error": str(exc)})
        peer = writer.get_extra_info("peername")
        return await self._answer(request, body, peer[0] if peer else None)

    async def _write(self, writer: asyncio.StreamWriter, code: int, body: bytes,
                     content_type: str, encoding: str) -> None:
        head = [f"HTTP/1.0 {code} {_REASONS.get(code, 'Status')}",
                "Server: dynamo-vllm", f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}", "Connection: close"]
        if encoding:
            head.append(f"Content-Encoding: {encoding}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()

    # ------------------------------------------------------------ routes

    async def _answer(self, request: Request, body: bytes, peer: str | None) -> Answer:
        if request.method == "GET":
            if request.path in (Route.STATUS, Route.ENDPOINTS) and not is_loopback(peer):
                # Pids, paths and states are for the node and its operators: from the
                # network (metrics.host opened), these need the token too.
                refused = refusal(peer, request.headers.get("authorization"),
                                  from_network=True, token=self.token)
                if refused is not None:
                    return _json(refused[0], {"error": refused[1]})
            return await self._get(request)
        if request.method == "POST":
            return await self._post(request, body, peer)
        return _json(405, {"error": f"{request.method} is not served; GET reads, POST goes to "
                                    f"{Route.CHECKPOINT} or {Route.RESTORE}"})

    async def _get(self, request: Request) -> Answer:
        path = request.path
        try:
            if path == Route.METRICS:
                return await self._metrics(request)
            if path == Route.STATUS:
                return _json(200, self.snapshot())
            if path == Route.ENDPOINTS:
                return _json(200, await self._on_loop(self.routes.endpoints(), READ_TIMEOUT_S))
            if path == Route.SERVICE_DISCOVERY:
                # Prometheus' HTTP service discovery format (http_sd_configs);
                # ?scope=fleet: every supervisor that publishes in etcd.
                fleet = "scope=fleet" in request.query.split("&")
                return _json(200, await self._on_loop(self.routes.scrape_targets(fleet),
                                                      READ_TIMEOUT_S))
            if path == Route.OPENAPI:
                return _json(200, supervisor_document())
            if path == Route.HEALTHZ:
                status = self.snapshot()
                return _json(200 if status.get("ready") else 503,
                             {"ready": status.get("ready"), "status": status.get("status")})
            return _json(404, {"error": f"no route {path}; try /metrics, /status, /endpoints, "
                                        "/sd, /healthz or /openapi.json"})
        except Unavailable as exc:
            return _json(503, {"error": str(exc)})
        except TimeoutError:
            return _json(503, {"error": "no answer from the supervisor's loop in time"})
        except Exception as exc:
            log.exception("error answering %s", path)
            return _json(500, {"error": f"{type(exc).__name__}: {exc}"})

    async def _metrics(self, request: Request) -> Answer:
        accepted = {part.split(";")[0].strip().lower()
                    for part in request.headers.get("accept-encoding", "").split(",")}
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, self._metrics_body, "gzip" in accepted)

    def _metrics_body(self, gzip: bool) -> Answer:
        parts = self.scrape()
        if gzip and sum(len(part) for part in parts) >= GZIP_MIN:
            # Prometheus asks for gzip; a scrape of many workers shrinks about tenfold.
            return 200, self.gzip.compress(parts), CONTENT_TYPE_LATEST, "gzip"
        return 200, b"".join(parts), CONTENT_TYPE_LATEST, ""

    async def _post(self, request: Request, body: bytes, peer: str | None) -> Answer:
        path = request.path
        if path not in (Route.CHECKPOINT, Route.RESTORE):
            return _json(405, {"error": f"{path} only reads (GET); POST goes to "
                                        f"{Route.CHECKPOINT} or {Route.RESTORE}"})
        refused = refusal(peer, request.headers.get("authorization"),
                          from_network=self.control_from_network, token=self.token)
        if refused is not None:
            return _json(refused[0], {"error": refused[1]})
        try:
            code, answer = await self._on_loop(self.routes.control(path, parse_body(body)),
                                               self.control_timeout)
        except BadRequest as exc:
            code, answer = 400, {"error": str(exc)}
        except TimeoutError:
            code, answer = 503, {"error": "no answer from the supervisor's loop in time"}
        except Exception as exc:
            log.exception("error answering POST %s", path)
            code, answer = 500, {"error": f"{type(exc).__name__}: {exc}"}
        return _json(code, answer)

    async def _on_loop(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        """Run a handler on the supervisor's loop and wait for its answer (TimeoutError)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except TimeoutError:
            future.cancel()
            raise


_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}
