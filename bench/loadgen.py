"""A streaming load generator for OpenAI-compatible completions (`dynamo-vllm bench`).

Requests are streamed completions whose prompt is a list of token ids, so input lengths
are exact without a tokenizer; `ignore_eos` makes output lengths exact. Load is closed
(`concurrency` requests in flight) or open (Poisson arrivals at `rate` per second, with an
optional cap on what is in flight). Each request records its time to first token, the gaps
between tokens, its end-to-end time, its token counts (from the server's `usage`) and any
error; nothing is left out of the counts: a request either completes or is an error.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from dynamo_vllm.bench.sse import DONE, async_sse_data

# Token ids safe in any vocabulary (a prompt of ids needs no tokenizer).
PROMPT_IDS = range(10, 100)


class LengthSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Lengths:
    """A fixed length, or one drawn per request: `128`, `uniform:64:256`, `normal:128:32`."""

    kind: str
    a: int
    b: int = 0

    @classmethod
    def parse(cls, text: str) -> Lengths:
        text = text.strip()
        if re.fullmatch(r"\d+", text):
            value = int(text)
            if value < 1:
                raise LengthSpecError(f"{text!r}: a length must be at least 1")
            return cls("fixed", value)
        found = re.fullmatch(r"(uniform|normal):(\d+):(\d+)", text)
        if not found:
            raise LengthSpecError(f"{text!r}: use N, uniform:MIN:MAX or normal:MEAN:STDDEV")
        kind, a, b = found.group(1), int(found.group(2)), int(found.group(3))
        if kind == "uniform" and not 1 <= a <= b:
            raise LengthSpecError(f"{text!r}: uniform needs 1 <= MIN <= MAX")
        if kind == "normal" and a < 1:
            raise LengthSpecError(f"{text!r}: normal needs a mean of at least 1")
        return cls(kind, a, b)

    def draw(self, rng: random.Random) -> int:
        if self.kind == "uniform":
            return rng.randint(self.a, self.b)
        if self.kind == "normal":
            return max(1, round(rng.gauss(self.a, self.b)))
        return self.a

    def __str__(self) -> str:
        return str(self.a) if self.kind == "fixed" else f"{self.kind}:{self.a}:{self.b}"


@dataclass
class RequestResult:
    target: str = ""
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float = 0.0
    tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


@dataclass
class LoadSpec:
    targets: list[str]
    model: str
    input_len: Lengths = field(default_factory=lambda: Lengths("fixed", 128))
    output_len: Lengths = field(default_factory=lambda: Lengths("fixed", 64))
    concurrency: int = 1
    rate: float | None = None
    requests: int | None = None
    duration: float | None = None
    warmup: int = 0
    timeout: float = 300.0
    seed: int = 0
    prefix_len: int = 0
    """Tokens every prompt starts with (prefix caching); counted in input_len."""


@dataclass
class LoadResult:
    spec: LoadSpec
    results: list[RequestResult]
    wall: float

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.error is None]

    @property
    def errors(self) -> int:
        return len(self.results) - len(self.ok)

    @property
    def output_tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.ok) / self.wall if self.wall > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return len(self.ok) / self.wall if self.wall > 0 else 0.0

    def ttft(self, q: float) -> float:
        return quantile([r.ttft for r in self.ok if r.ttft is not None], q)

    def itl(self, q: float) -> float:
        return quantile([x for r in self.ok for x in r.itls], q)

    def e2e(self, q: float) -> float:
        return quantile([r.e2e for r in self.ok], q)

    def error_kinds(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for r in self.results:
            if r.error is not None:
                kinds[r.error] = kinds.get(r.error, 0) + 1
        return kinds


def quantile(values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation (numpy's default); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def one_request(client: httpx.AsyncClient, target: str, model: str, prompt: list[int],
                      max_tokens: int) -> RequestResult:
    result = RequestResult(target=target)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    started = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", target + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                result.error = f"HTTP {resp.status_code}"
                return result
            async for data in async_sse_data(resp.aiter_text()):
                if data == DONE:
                    continue
                chunk = json.loads(data)
                usage = chunk.get("usage")
                if usage:
                    result.tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                choices = chunk.get("choices") or []
                if not choices or not choices[0].get("text"):
                    continue
                now = time.perf_counter()
                if result.ttft is None:
                    result.ttft = now - started
                else:
                    result.itls.append(now - last)
                last = now
                chunks += 1
                if choices[0].get("finish_reason") == "abort":
                    result.error = "aborted by the server"
    except (httpx.HTTPError, ValueError) as exc:
        result.error = type(exc).__name__
    result.e2e = time.perf_counter() - started
    if result.error is None and result.tokens == 0:
        result.tokens = chunks  # a server without usage in the stream
    if result.error is None and result.tokens < max_tokens:
        result.error = f"truncated: {result.tokens} of {max_tokens} tokens"
    return result


async def run(spec: LoadSpec, progress: Callable[[RequestResult], None] | None = None
              ) -> LoadResult:
    """Warm up, then send the measured requests; stop at `requests` or after `duration`."""
    if not spec.targets:
        raise ValueError("no target to send requests to")
    rng = random.Random(spec.seed)
    prefix = [rng.choice(PROMPT_IDS) for _ in range(spec.prefix_len)]
    cap = spec.concurrency if spec.rate is None else max(spec.concurrency, 1)
    limits = httpx.Limits(max_connections=max(cap, 1) * len(spec.targets) + 8)
    counter = 0

    def next_request() -> tuple[str, list[int], int]:
        nonlocal counter
        target = spec.targets[counter % len(spec.targets)]
        counter += 1
        length = max(spec.input_len.draw(rng) - len(prefix), 1)
        prompt = prefix + [rng.choice(PROMPT_IDS) for _ in range(length)]
        return target, prompt, spec.output_len.draw(rng)

    async with httpx.AsyncClient(timeout=spec.timeout, limits=limits) as client:
        for _ in range(spec.warmup):
            target, prompt, out = next_request()
            await one_request(client, target, spec.model, prompt, out)

        results: list[RequestResult] = []
        started = time.perf_counter()
        deadline = started + spec.duration if spec.duration else None
        total = spec.requests

        def more() -> bool:
            if total is not None and issued >= total:
                return False
            return deadline is None or time.perf_counter() < deadline

        async def send() -> None:
            target, prompt, out = next_request()
            result = await one_request(client, target, spec.model, prompt, out)
            results.append(result)
            if progress is not None:
                progress(result)

        issued = 0
        if spec.rate is None:
            async def closed_loop() -> None:
                nonlocal issued
                while more():
                    issued += 1
                    await send()
            await asyncio.gather(*(closed_loop() for _ in range(spec.concurrency)))
        else:
            gate = asyncio.Semaphore(spec.concurrency) if spec.concurrency > 0 else None
            tasks = []

            async def gated() -> None:
                if gate is None:
                    await send()
                    return
                async with gate:
                    await send()

            while more():
                issued += 1
                tasks.append(asyncio.create_task(gated()))
                await asyncio.sleep(rng.expovariate(spec.rate))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
    return LoadResult(spec, results, wall)
