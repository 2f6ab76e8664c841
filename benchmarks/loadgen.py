"""A small streaming load generator for OpenAI-compatible completions (benchmarks only)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float = 0.0
    tokens: int = 0
    error: str | None = None


@dataclass
class LoadResult:
    results: list[RequestResult]
    wall: float

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.error is None]

    @property
    def output_tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.ok) / self.wall

    def ttft(self, q: float) -> float:
        return quantile([r.ttft for r in self.ok if r.ttft is not None], q)

    def itl(self, q: float) -> float:
        return quantile([x for r in self.ok for x in r.itls], q)

    @property
    def errors(self) -> int:
        return len(self.results) - len(self.ok)


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def _sse_data(resp: httpx.Response) -> AsyncIterator[str]:
    # Split on "\n" only: aiter_lines also splits on U+2028 and the like, which a model may
    # generate inside a JSON string.
    buffer = ""
    async for text in resp.aiter_text():
        buffer += text
        *lines, buffer = buffer.split("\n")
        for line in lines:
            if line.startswith("data: "):
                yield line[len("data: "):]


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str,
               max_tokens: int) -> RequestResult:
    result = RequestResult()
    started = last = time.perf_counter()
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}"
                return result
            async for data in _sse_data(resp):
                if data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if result.ttft is None:
                    result.ttft = now - started
                else:
                    result.itls.append(now - last)
                last = now
                result.tokens += 1
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.e2e = time.perf_counter() - started
    return result


async def run_load(url: str, model: str, requests: int, concurrency: int,
                   max_tokens: int = 64, prompt: str = "hello world") -> LoadResult:
    """`requests` streaming completions, at most `concurrency` at a time."""
    limits = httpx.Limits(max_connections=concurrency)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    results: list[RequestResult] = []
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker() -> None:
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await _one(client, url, model, prompt, max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return LoadResult(results, wall)
