"""A tiny asyncio HTTP/1.0 client for the workers' /health and control routes (no
third-party client in the supervisor's poll path).

It reads a whole response: the head up to its blank line, then `Content-Length` bytes of
body (or up to the end of the connection, which HTTP/1.0 closes after each answer). A
server may send the head and the body in separate writes (uvicorn does); a single read
could see only the head.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
from typing import Any

# Larger answers are refused: /health and the control routes answer a few hundred bytes.
MAX_RESPONSE = 1 << 20


class PollError(Exception):
    pass


class LocalExhaustion(PollError):
    """The supervisor itself is out of file descriptors or memory: says nothing about the
    worker, so it never counts as the worker's failure."""


_LOCAL_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


async def get_json(host: str, port: int, path: str, timeout: float) -> tuple[int, Any]:
    """GET http://host:port/path; (status, parsed JSON body). Raises PollError or TimeoutError."""
    return await _request(host, port, f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode(),
                          timeout)


async def post_json(host: str, port: int, path: str, body: Any, timeout: float,
                    token: str | None = None) -> tuple[int, Any]:
    """POST a JSON body, with the control token when given; (status, parsed JSON body).
    Raises PollError or TimeoutError."""
    data = json.dumps(body).encode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (f"POST {path} HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"{auth}Content-Length: {len(data)}\r\n\r\n").encode()
    return await _request(host, port, head + data, timeout)


def _parse_head(head: bytes) -> tuple[int, int | None]:
    """(status, Content-Length or None) of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise PollError(f"not an HTTP answer: {head[:80]!r}") from None
    length: int | None = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            try:
                length = int(value.strip())
            except ValueError:
                raise PollError(f"bad Content-Length: {value.strip()[:40]!r}") from None
    if length is not None and not 0 <= length <= MAX_RESPONSE:
        raise PollError(f"an answer of {length} bytes (at most {MAX_RESPONSE})")
    return status, length


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise PollError(f"the connection closed before a whole answer: {exc.partial[:80]!r}"
                        ) from None
    except asyncio.LimitOverrunError:
        raise PollError("an answer whose head has no end") from None
    status, length = _parse_head(head)
    if length is not None:
        try:
            return status, await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise PollError(f"the body ended after {len(exc.partial)} of {length} bytes"
                            ) from None
    body = await reader.read(MAX_RESPONSE + 1)
    while body and len(body) <= MAX_RESPONSE:
        more = await reader.read(MAX_RESPONSE + 1 - len(body))
        if not more:
            break
        body += more
    if len(body) > MAX_RESPONSE:
        raise PollError(f"an answer of more than {MAX_RESPONSE} bytes")
    return status, body


async def _request(host: str, port: int, request: bytes, timeout: float) -> tuple[int, Any]:
    async def fetch() -> tuple[int, Any]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request)
            await writer.drain()
            status, body = await _read_response(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, None

    try:
        return await asyncio.wait_for(fetch(), timeout)
    except OSError as exc:
        if exc.errno in _LOCAL_ERRNOS:
            raise LocalExhaustion(str(exc)) from exc
        raise PollError(str(exc) or type(exc).__name__) from exc
