"""A tiny asyncio HTTP/1.0 GET for polling workers' /health (no third-party client needed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any


class PollError(Exception):
    pass


async def get_json(host: str, port: int, path: str, timeout: float) -> tuple[int, Any]:
    """GET http://host:port/path; (status, parsed JSON body). Raises PollError or TimeoutError."""
    async def fetch() -> tuple[int, Any]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
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
