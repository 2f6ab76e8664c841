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
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 500, "ignore_eos": True,
            "stream": True, "temperature": 0}
    chunks, finish = 0, None
    with httpx.stream("POST", worker.base + "/v1/completions", json=body, timeout=120) as resp:
        status = resp.status_code
        for data in sse_data(resp):
            if data == "[DONE]":
                continue
            choice = json.loads(data)["choices"][0]
            chunks += 1
            started.set()
            finish = choice.get("finish_reason") or finish
    results.append({"status": status, "chunks": chunks, "finish": finish,
                    "ended": time.monotonic()})
