"""Steady streaming load on the serving workers, and what became of every request.

Each request asks for an exact number of tokens (`ignore_eos`), so that a stream cut short
is seen even when it ends "cleanly". Outcomes:
- completed: `[DONE]` after exactly the tokens asked for;
- failed: an explicit error: an HTTP status, a refused or reset connection, a stream
  that breaks off with a transport error, an error event, `finish_reason` abort;
- lost: anything else: no answer within the request's deadline (hung), or a stream that
  ends without `[DONE]` or with fewer tokens and no error (truncated silently).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx

from dynamo_vllm.bench.sse import DONE, SseDecoder

COMPLETED, FAILED, LOST = "completed", "failed", "lost"


@dataclass
class Outcome:
    started: float
    ended: float
    worker: int
    result: str
    detail: str


class Load:
    """`clients` threads, each sending one streaming request after another to a worker
    that serves now (from `targets()`: {worker index: port})."""

    def __init__(self, targets: Callable[[], dict[int, int]], model: str, clients: int = 2,
                 seed: int = 0, deadline: float = 60.0, max_tokens: tuple[int, int] = (8, 24),
                 pause: float = 0.2):
        self.targets = targets
        self.model = model
        self.clients = clients
        self.seed = seed
        self.deadline = deadline
        self.max_tokens = max_tokens
        # A CPU engine under constant load spins both cores of a small machine and starves
        # a restarting worker: a short pause between requests keeps the load steady but fair.
        self.pause = pause
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for n in range(self.clients):
            thread = threading.Thread(target=self._client, args=(n,), name=f"soak-client-{n}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 90.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise AssertionError(f"load clients still running after {timeout:g} s: {alive}")

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(o.result for o in self.outcomes)

    def _client(self, n: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        sent = 0
        with httpx.Client(timeout=httpx.Timeout(5.0, read=30.0)) as client:
            while not self._stop.is_set():
                targets = self.targets()
                if not targets:
                    time.sleep(0.1)
                    continue
                worker = rng.choice(sorted(targets))
                tokens = rng.randint(*self.max_tokens)
                sent += 1
                started = time.monotonic()
                result, detail = self._one(client, targets[worker], tokens,
                                           f"soak client {n} request {sent}")
                with self._lock:
                    self.outcomes.append(Outcome(started, time.monotonic(), worker, result,
                                                 detail))
                self._stop.wait(self.pause)

    def _one(self, client: httpx.Client, port: int, tokens: int, prompt: str) -> tuple[str, str]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        deadline = time.monotonic() + self.deadline
        got, finish, done = 0, None, False
        try:
            with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions",
                               json=body) as resp:
                if resp.status_code != 200:
                    resp.read()
                    return FAILED, f"HTTP {resp.status_code}: {resp.text[:120]}"
                for data in _payloads(resp, deadline):
                    if data == DONE:
                        done = True
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        return FAILED, f"error event: {str(event['error'])[:120]}"
                    for choice in event.get("choices") or []:
                        finish = choice.get("finish_reason") or finish
                    usage = event.get("usage")
                    if usage:
                        got = int(usage.get("completion_tokens") or 0)
        except _PastDeadline:
            return LOST, f"no end within {self.deadline:g} s (hung)"
        except httpx.TimeoutException as exc:
            return LOST, f"timed out: {type(exc).__name__}"
        except httpx.TransportError as exc:
            return FAILED, f"{type(exc).__name__}: {exc}"[:160]
        if finish in ("abort", "error"):
            return FAILED, f"finish_reason {finish}"
        if not done:
            return LOST, f"stream ended without [DONE] after {got} token(s)"
        if got != tokens:
            return LOST, f"{got} of {tokens} tokens, finish_reason {finish}"
        return COMPLETED, ""


class _PastDeadline(Exception):
    pass


def _payloads(resp: httpx.Response, deadline: float) -> Iterator[str]:
    """The stream's `data:` payloads; _PastDeadline when it runs past `deadline` (hung)."""
    decoder = SseDecoder()
    for text in resp.iter_text():
        if time.monotonic() > deadline:
            raise _PastDeadline
        yield from decoder.feed(text)
    yield from decoder.close()
