"""Bad input to a real worker: one line naming the cause, the config exit code, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_vllm.contract.protocol import ExitCode
from tests.harness import engine_config, free_port, write_config


def run_worker(config_path: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dynamo_vllm.cli.main", "worker", "--config",
         str(config_path)],
        capture_output=True, text=True, timeout=timeout)


def test_missing_model_path(tmp_path: Path) -> None:
    config = engine_config(tmp_path / "no-such-model", free_port())
    result = run_worker(write_config(tmp_path / "c.toml", config), timeout=30)
    assert result.returncode == ExitCode.CONFIG
    assert "model.path" in result.stderr and "not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_key_and_bad_type_reported_together(tmp_path: Path) -> None:
    config = engine_config(tmp_path, free_port())
    config["workers"]["cout"] = 2
    config["health"]["interval"] = "fast"
    result = run_worker(write_config(tmp_path / "c.toml", config), timeout=30)
    assert result.returncode == ExitCode.CONFIG
    assert "workers.cout: unknown key (did you mean 'count'?)" in result.stderr
    assert "health.interval: must be a number" in result.stderr


@pytest.mark.engine
def test_engine_argument_refused_by_vllm(tiny_model: Path, tmp_path: Path) -> None:
    config = engine_config(tiny_model, free_port())
    config["engine"]["max_num_seqs"] = "lots"
    result = run_worker(write_config(tmp_path / "c.toml", config))
    assert result.returncode == ExitCode.CONFIG, result.stderr[-3000:]
    assert "engine.max_num_seqs" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.engine
def test_unknown_engine_argument(tiny_model: Path, tmp_path: Path) -> None:
    config = engine_config(tiny_model, free_port())
    config["engine"]["warp_speed"] = 9
    result = run_worker(write_config(tmp_path / "c.toml", config))
    assert result.returncode == ExitCode.CONFIG, result.stderr[-3000:]
    assert "engine.warp_speed" in result.stderr


def test_port_in_use(tiny_model: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = engine_config(tiny_model, port)
        result = run_worker(write_config(tmp_path / "c.toml", config), timeout=30)
    assert result.returncode == ExitCode.CONFIG
    assert "workers.base_port" in result.stderr and str(port) in result.stderr
