"""A real worker whose engine dies or hangs: it must notice, say so, and exit with its code."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx
import pytest

from dynamo_vllm.contract.protocol import ExitCode
from tests.harness import (
    WorkerProcess,
    engine_config,
    free_port,
    stream_completion,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.engine


def start(tiny_model: Path, tmp_path: Path, **sections: dict) -> WorkerProcess:
    port = free_port()
    config = engine_config(tiny_model, port, **sections)
    return WorkerProcess(write_config(tmp_path / "tiny.toml", config), port,
                         tmp_path / "worker.log")


def test_engine_core_sigkill_exits_engine_dead(tiny_model: Path, tmp_path: Path) -> None:
    # Default health settings: the worker waits on EngineCore's sentinel, not on a poll.
    worker = start(tiny_model, tmp_path)
    try:
        worker.wait_serving()
        core = worker.engine_core()
        worker.remember_children()
        core.send_signal(signal.SIGKILL)
        assert worker.wait_exit(30) == ExitCode.ENGINE_DEAD, worker.log()
        wait_for(lambda: not worker.alive_leftovers(), 10, what="no vLLM process left")
        # "was killed by signal 9", or "exited" when vLLM's own monitor thread reaped it first.
        assert f"engine dead: EngineCore (pid {core.pid})" in worker.log()
    finally:
        worker.cleanup()


def test_engine_core_sigstop_mid_stream_exits_unhealthy(tiny_model: Path,
                                                        tmp_path: Path) -> None:
    # Default health settings. vLLM's own check_health() still says healthy; the stall check
    # sees a stream whose engine makes no step.
    worker = start(tiny_model, tmp_path)
    results: list[dict] = []
    started = threading.Event()

    def stream() -> None:
        try:
            stream_completion(worker, results, started)
        except (httpx.HTTPError, KeyError) as exc:  # the worker goes down under it (an error event)
            results.append({"error": repr(exc)})

    try:
        worker.wait_serving()
        core = worker.engine_core()
        client = threading.Thread(target=stream, daemon=True)
        client.start()
        assert started.wait(60), worker.log()
        core.send_signal(signal.SIGSTOP)
        assert worker.wait_exit(45) == ExitCode.UNHEALTHY, worker.log()
        assert "request(s) in flight" in worker.log()
        wait_for(lambda: not worker.alive_leftovers(), 15, what="no vLLM process left")
        client.join(30)
        assert not any(r.get("finish") == "length" for r in results), results
    finally:
        worker.cleanup()
