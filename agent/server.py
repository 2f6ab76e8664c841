"""The worker's HTTP front: our routes in front of vLLM's own OpenAI app.

The listening socket is bound before the engine loads, so a port conflict is found at
once and `/health` answers `loading` while the model loads. Once the engine serves, vLLM's
app (built by `build_app` on our engine) takes every route that is not ours. Routes are
dispatched here rather than spliced into vLLM's route list: vLLM's `/health` can then
never shadow ours, whatever order vLLM registers its routes in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import uvicorn

from dynamo_vllm.agent.control import ROUTES, ControlRoutes
from dynamo_vllm.agent.idle_sleep import IdleSleep
from dynamo_vllm.agent.lifecycle import error
from dynamo_vllm.agent.status import WorkerStatus
from dynamo_vllm.contract.gate import MAX_BODY
from dynamo_vllm.contract.openapi import worker_document
from dynamo_vllm.contract.protocol import Route, WorkerState

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Routes that keep answering whatever the worker's state (reading them changes nothing).
_ALWAYS_OPEN = {Route.METRICS, "/version"}


class PortInUse(Exception):
    pass


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the worker's listening socket now; raise PortInUse naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


async def send_json(send: Send, status: int, body: Any,
                    headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


async def _drain_body(receive: Receive) -> None:
    message = await receive()
    while message.get("more_body"):
        message = await receive()


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None when it is larger than `limit`."""
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks) if size <= limit else None


def unavailable_body(state: WorkerState, reason: str) -> dict[str, Any]:
    # Shaped like vLLM's OpenAI errors, so clients parse it the same way.
    return {"error": {"message": f"worker is {state.value}: {reason}",
                      "type": "ServiceUnavailable", "code": 503}}


class WorkerApp:
    """ASGI app: `/health` is ours; everything else goes to vLLM's app once it serves."""

    def __init__(self, status: WorkerStatus, identity: dict[str, Any], control: ControlRoutes):
        self.status = status
        self.identity = identity
        self.control = control
        self.inner: ASGIApp | None = None
        self.idle: IdleSleep | None = None
        # Requests handed to vLLM's app and not yet answered (streams until their end). A
        # request can be admitted here before vLLM's engine knows of it: sleep drains both.
        self.inflight = 0

    def health_body(self) -> dict[str, Any]:
        body = {**self.identity, **self.status.as_dict(), "pid": os.getpid()}
        if self.control.controller is not None:
            body["sleep"] = self.control.controller.describe()
        return body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return
        path = scope.get("path", "")
        if scope["type"] == "http" and path == Route.HEALTH:
            await _drain_body(receive)
            code = 200 if self.status.serving else 503
            await send_json(send, code, self.health_body())
            return
        if scope["type"] == "http" and path in ROUTES:
            await self._control(scope, receive, send, path)
            return
        if scope["type"] == "http" and path == Route.WORKER_OPENAPI:
            await _drain_body(receive)
            await send_json(send, 200, worker_document())
            return
        state = self.status.state
        if self.inner is not None and path in _ALWAYS_OPEN:
            await self.inner(scope, receive, send)
            return
        if state is WorkerState.SLEEPING and self.idle is not None \
                and await self.idle.wake_for_request():
            state = self.status.state
        if self.inner is not None and state is WorkerState.SERVING:
            self.inflight += 1
            try:
                await self.inner(scope, receive, send)
            finally:
                self.inflight -= 1
                if self.idle is not None:
                    self.idle.request_seen()
            return
        if scope["type"] != "http":
            return
        await _drain_body(receive)
        await send_json(send, 503, unavailable_body(state, self.status.reason),
                        headers={"Retry-After": "5"})


    async def _control(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        raw = await _read_body(receive, MAX_BODY)
        if raw is None:
            code, body = error(413, f"the body is larger than {MAX_BODY} bytes")
        else:
            client = scope.get("client")
            authorization = next((value.decode("latin-1") for name, value in
                                  scope.get("headers", []) if name == b"authorization"), None)
            try:
                code, body = await self.control.handle(scope["method"], path, raw,
                                                       client[0] if client else None,
                                                       authorization)
            except Exception as exc:  # the engine failed under us: say so, in JSON
                log.exception("%s failed", path)
                code, body = error(500, f"{type(exc).__name__}: {exc}")
        await send_json(send, code, body)


class Server(uvicorn.Server):
    """uvicorn without its own signal handling: the worker decides how to stop.

    A plain uvicorn.Server re-raises SIGTERM after serve() returns, killing the process
    before the engine is shut down and orphaning EngineCore (reference/vllm-cpu.md).
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_server(app: ASGIApp, log_level: str, graceful_timeout: float) -> Server:
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level=log_level,
        # No logging config of uvicorn's own: its loggers reach the worker's handler
        # (journald's priorities and fields) like every other line.
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(graceful_timeout)),
        # The control gate decides "loopback" from the socket's peer: a same-host proxy
        # must not turn a forged X-Forwarded-For into a local client.
        proxy_headers=False,
    )
    return Server(config)
