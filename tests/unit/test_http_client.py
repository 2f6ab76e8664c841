"""The supervisor's poll client reads whole answers, however the server splits its writes."""

from __future__ import annotations

import asyncio

import pytest

from dynamo_vllm.supervisor import http_client


async def serve_once(parts: list[bytes], pause: float = 0.05) -> tuple[asyncio.Server, int]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause)  # a separate write, as uvicorn sends head and body
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def get(parts: list[bytes]) -> tuple[int, object]:
    async def main() -> tuple[int, object]:
        server, port = await serve_once(parts)
        async with server:
            return await http_client.get_json("127.0.0.1", port, "/health", 5.0)

    return asyncio.run(main())


BODY = b'{"state": "serving", "reason": "serving tiny"}'


def test_head_and_body_in_two_writes() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" \
           b"Content-Length: %d\r\n\r\n" % len(BODY)
    assert get([head, BODY]) == (200, {"state": "serving", "reason": "serving tiny"})


def test_a_body_in_pieces_without_a_length_is_read_to_the_end() -> None:
    head = b"HTTP/1.0 503 Service Unavailable\r\n\r\n"
    assert get([head, BODY[:10], BODY[10:]]) == (503, {"state": "serving",
                                                       "reason": "serving tiny"})


@pytest.mark.parametrize(("parts", "problem"), [
    ([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"{}"], "ended after 2 of 100"),
    ([b"HTTP/1.1 200 OK\r\nContent-Le"], "closed before a whole answer"),
    ([b"garbage\r\n\r\n"], "not an HTTP answer"),
    ([b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n"], "at most"),
])
def test_a_broken_answer_is_a_poll_error(parts: list[bytes], problem: str) -> None:
    with pytest.raises(http_client.PollError, match=problem):
        get(parts)
