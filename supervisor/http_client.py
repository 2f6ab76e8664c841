"""A tiny asyncio HTTP/1.0 client for the workers' /health and control routes (no
third-party client needed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any


class PollError(Exception):
    pass


async def get_json(host: str, port: int, path: str, timeout: float) -> tuple[int, Any]:
    """GET http://host:port/path; (status, parsed JSON body). Raises PollError or TimeoutError."""
    return await _request(host, port, f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode(),
                          timeout)


async def post_json(host: str, port: int, path: str, body: Any, timeout: float) -> tuple[int, Any]:
    """POST a JSON body; (status, parsed JSON body). Raises PollError or TimeoutError."""
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    return await _request(host, port, head + data, timeout)


async def _request(host: str, port: int, request: bytes, timeout: float) -> tuple[int, Any]:
    async def fetch() -> tuple[int, Any]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request)
            await writer.drain()
            raw = await reader.read(1 << 20)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        head, _, body = raw.partition(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise PollError(f"not an HTTP answer: {head[:80]!r}") from None
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, None

    try:
        return await asyncio.wait_for(fetch(), timeout)
    except OSError as exc:
        raise PollError(str(exc) or type(exc).__name__) from exc
