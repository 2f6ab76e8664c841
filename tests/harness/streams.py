"""Streaming completions: the SSE payloads of a response, and a stream run in a thread."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx

from dynamo_vllm.bench.sse import sse_data as decoded_sse
from tests.harness.processes import WorkerProcess


def sse_data(resp: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of a streaming response (the project's one decoder)."""
    return decoded_sse(resp.iter_text())


def stream_completion(worker: WorkerProcess, results: list[dict], started: threading.Event) -> None:
    """One 500-token stream: its status, chunks (a busy server may carry several tokens in
    one), finish reason, tokens (the usage the server counts at the end; None if cut)."""
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 500, "ignore_eos": True,
            "stream": True, "temperature": 0, "stream_options": {"include_usage": True}}
    chunks, finish, tokens = 0, None, None
    with httpx.stream("POST", worker.base + "/v1/completions", json=body, timeout=120) as resp:
        status = resp.status_code
        for data in sse_data(resp):
            if data == "[DONE]":
                continue
            event = json.loads(data)
            if not event.get("choices"):  # the usage chunk, last
                tokens = (event.get("usage") or {}).get("completion_tokens")
                continue
            chunks += 1
            started.set()
            finish = event["choices"][0].get("finish_reason") or finish
    results.append({"status": status, "chunks": chunks, "finish": finish, "tokens": tokens,
                    "ended": time.monotonic()})


class SteadyStreams:
    """`concurrency` clients, each streaming completions one after another (a `pause`
    between them) to `base` until `stop()`: each request's outcome, start, TTFT and end."""

    def __init__(self, base: str, concurrency: int = 2, max_tokens: int = 32,
                 pause: float = 0.2):
        self.base = base
        self.body = {"model": "tiny", "prompt": "steady", "max_tokens": max_tokens,
                     "ignore_eos": True, "stream": True}
        self.pause = pause
        self.results: list[dict] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True,
                                          name=f"steady-{i}") for i in range(concurrency)]

    def start(self) -> SteadyStreams:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 90) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def failed(self) -> list[dict]:
        return [r for r in self.results if r["error"] is not None or r["finish"] != "length"]

    def _client(self) -> None:
        while not self._stop.is_set():
            self.results.append(self._one())
            self._stop.wait(self.pause)

    def _one(self) -> dict:
        outcome: dict = {"finish": None, "error": None, "tokens": 0, "ttft": None,
                         "started": time.monotonic()}
        try:
            with httpx.stream("POST", self.base + "/v1/completions", json=self.body,
                              timeout=60) as resp:
                if resp.status_code != 200:
                    outcome["error"] = f"HTTP {resp.status_code}: {resp.read()[:200]!r}"
                for data in sse_data(resp):
                    if data == "[DONE]":
                        continue
                    event = json.loads(data)
                    if "choices" not in event:
                        outcome["error"] = event
                        continue
                    if outcome["ttft"] is None:
                        outcome["ttft"] = time.monotonic() - outcome["started"]
                    outcome["tokens"] += 1
                    outcome["finish"] = event["choices"][0].get("finish_reason") \
                        or outcome["finish"]
        except httpx.HTTPError as exc:
            outcome["error"] = repr(exc)
        outcome["ended"] = time.monotonic()
        return outcome
