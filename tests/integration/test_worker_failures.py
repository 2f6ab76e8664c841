"""A real worker whose engine dies or hangs: it must notice, say so, and exit with its code."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from dynamo_vllm.contract.protocol import ExitCode
from tests.harness import WorkerProcess, engine_config, free_port, wait_for, write_config

pytestmark = pytest.mark.engine


def start(tiny_model: Path, tmp_path: Path, **sections: dict) -> WorkerProcess:
    port = free_port()
    config = engine_config(tiny_model, port, **sections)
    return WorkerProcess(write_config(tmp_path / "tiny.toml", config), port,
                         tmp_path / "worker.log")


def test_engine_core_sigkill_exits_engine_dead(tiny_model: Path, tmp_path: Path) -> None:
    worker = start(tiny_model, tmp_path, health={"interval": 1.0, "canary": False})
    try:
        worker.wait_serving()
        core = worker.engine_core()
        worker.remember_children()
        killed_at = time.monotonic()
        core.send_signal(signal.SIGKILL)
        # Detection takes one interval plus vLLM's own notice (a few seconds); the bounded
        # shutdown of a dead engine returns at once.
        assert worker.wait_exit(30) == ExitCode.ENGINE_DEAD, worker.log()
        elapsed = time.monotonic() - killed_at
        assert elapsed < 30
        wait_for(lambda: not worker.alive_leftovers(), 10, what="no vLLM process left")
        assert "engine dead" in worker.log()
    finally:
        worker.cleanup()


def test_engine_core_sigstop_exits_unhealthy(tiny_model: Path, tmp_path: Path) -> None:
    worker = start(tiny_model, tmp_path, health={
        "interval": 1.0, "canary_idle": 2.0, "canary_timeout": 1.0, "canary_failures": 2})
    try:
        worker.wait_serving()
        core = worker.engine_core()
        core.send_signal(signal.SIGSTOP)
        # vLLM's own check_health() still says healthy; only the canary can see this.
        # Detection: canary_idle + canary_failures x (timeout + retry), then a bounded stop.
        assert worker.wait_exit(45) == ExitCode.UNHEALTHY, worker.log()
        assert "canary" in worker.log()
        wait_for(lambda: not worker.alive_leftovers(), 15, what="no vLLM process left")
    finally:
        worker.cleanup()
