"""The frontend child's logic without processes: its command and environment, what its
/health says, readiness with a front door, and [frontend] checked with its keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dynamo_vllm.contract import config as cfg
from dynamo_vllm.supervisor.frontend import (
    frontend_command,
    frontend_environment,
    workers_listed,
)
from dynamo_vllm.supervisor.readiness import FrontendView, Sent, Settings, WorkerView, readiness


def config(tmp_path: Path, **frontend: Any) -> cfg.Config:
    (tmp_path / "config.json").write_text("{}")
    return cfg.from_dict({"model": {"path": str(tmp_path), "served_name": "tiny"},
                          "dynamo": {"enabled": True, "file_kv": "/srv/kv"},
                          "frontend": {"enabled": True, **frontend}})


def test_the_command_carries_discovery_router_and_passed_arguments(tmp_path: Path) -> None:
    c = config(tmp_path, port=8010, router_mode="round-robin",
               args={"migration_max_seq_len": 4096, "busy-threshold": 0.9})
    argv = frontend_command(c, "/opt/engine/bin/python")
    # Under the journal relay, on the engine's interpreter both.
    assert argv[:5] == ["/opt/engine/bin/python", "-m", "dynamo_vllm.supervisor.journal_relay",
                        "frontend", "--"]
    assert argv[5:8] == ["/opt/engine/bin/python", "-m", "dynamo.frontend"]
    pairs = dict(zip(argv[8::2], argv[9::2], strict=False))
    assert pairs["--discovery-backend"] == "file" and pairs["--router-mode"] == "round-robin"
    assert pairs["--http-host"] == "127.0.0.1" and pairs["--http-port"] == "8010"
    assert pairs["--namespace"] == "dynamo" and pairs["--migration-limit"] == "3"
    assert pairs["--migration-max-seq-len"] == "4096" and pairs["--busy-threshold"] == "0.9"
    env = frontend_environment(c, {"NOTIFY_SOCKET": "/run/x", "PATH": "/bin"})
    assert "NOTIFY_SOCKET" not in env and env["PATH"] == "/bin"
    assert env["DYN_FILE_KV"] == "/srv/kv" and env["DYN_TCP_RESPONSE_STREAM_HOST"] == "127.0.0.1"


def test_workers_listed_counts_this_namespaces_generate_instances(tmp_path: Path) -> None:
    c = config(tmp_path)
    health = {"status": "healthy", "instances": [
        {"namespace": "dynamo", "component": "backend", "endpoint": "generate"},
        {"namespace": "dynamo", "component": "backend", "endpoint": "generate"},
        {"namespace": "dynamo", "component": "backend", "endpoint": "sleep"},
        {"namespace": "other", "component": "backend", "endpoint": "generate"},
        "junk"]}
    assert workers_listed(health, c) == 2
    assert workers_listed({"instances": "nope"}, c) == 0 and workers_listed([], c) == 0


SETTINGS = Settings(min_ready=1, unready_grace=30.0, watchdog=True)
SERVING = [WorkerView(available=True, serving=True)]


def test_ready_waits_for_the_front_door() -> None:
    waiting = readiness(0.0, SERVING, SETTINGS, Sent(), FrontendView(serving=False))
    assert not waiting.ready and not waiting.send_ready and waiting.healthy
    ready = readiness(1.0, SERVING, SETTINGS, waiting.sent, FrontendView(serving=True))
    assert ready.ready and ready.send_ready
    assert readiness(1.0, SERVING, SETTINGS, Sent()).ready  # no frontend: workers decide


def test_a_frontend_given_up_stops_the_service() -> None:
    verdict = readiness(0.0, SERVING, SETTINGS, Sent(), FrontendView(serving=False,
                                                                     failed=True))
    assert verdict.exit_code is not None and verdict.exit_reason == "the frontend was given up"


@pytest.mark.parametrize("raw, key", [
    ({"frontend": {"enabled": True}}, "frontend.enabled: needs dynamo.enabled"),
    ({"dynamo": {"enabled": True}, "frontend": {"enabled": True, "port": 9400}},
     "frontend.port: 9400 is also metrics.port"),
    ({"frontend": {"router_mode": "fastest"}}, "frontend.router_mode"),
    ({"frontend": {"args": {"Bad Key": 1}}}, "frontend.args"),
    ({"frontend": {"args": {"x": [1]}}}, "frontend.args"),
])
def test_bad_frontend_settings_name_their_key(tmp_path: Path, raw: dict[str, Any],
                                              key: str) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.from_dict({"model": {"path": str(tmp_path)}, **raw})
    assert any(key in error for error in info.value.errors), info.value.errors
