"""Server-sent events as OpenAI's streaming API sends them: the `data:` payloads, and
nothing else. One decoder for the bench tool, the soak and the tests.

Split on "\\n" only: httpx's `iter_lines` also splits on characters such as U+2028 and
\\x1c, which a model may well generate inside a JSON string. A stream that ends without a
final newline still yields its last payload (`close`).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

DATA = "data: "
DONE = "[DONE]"


class SseDecoder:
    """Incremental: `feed` each chunk of text as it arrives, `close` at the end."""

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, text: str) -> list[str]:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        return [line[len(DATA):] for line in lines if line.startswith(DATA)]

    def close(self) -> list[str]:
        rest, self._buffer = self._buffer, ""
        return [rest[len(DATA):]] if rest.startswith(DATA) else []


def sse_data(chunks: Iterable[str]) -> Iterator[str]:
    """The payloads of a stream read synchronously (`httpx.Response.iter_text()`)."""
    decoder = SseDecoder()
    for text in chunks:
        yield from decoder.feed(text)
    yield from decoder.close()


async def async_sse_data(chunks: AsyncIterable[str]) -> AsyncIterator[str]:
    """The payloads of a stream read asynchronously (`httpx.Response.aiter_text()`)."""
    decoder = SseDecoder()
    async for text in chunks:
        for data in decoder.feed(text):
            yield data
    for data in decoder.close():
        yield data
