"""The supervisor against scripted workers: restart, backoff and give-up logic, fast.

A script stands in for the workers' interpreter (`workers.python`), so these tests prove
the supervisor's decisions; the engine tests prove the real thing.
"""

from __future__ import annotations

import json
import socket
import stat
import tomllib
from pathlib import Path

import httpx

from dynamo_vllm.contract.protocol import ExitCode
from tests.harness import (
    EtcdServer,
    SupervisorProcess,
    b64,
    free_port,
    wait_for,
    write_config,
)


def fake_python(tmp: Path, body: str) -> Path:
    script = tmp / "fake-python"
    script.write_text(f"#!/bin/sh\necho started >> {tmp}/starts\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def scripted_config(tmp: Path, python: Path, metrics_port: int, **workers: object) -> Path:
    model = tmp / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    config = {
        "model": {"path": str(model), "served_name": "fake"},
        "workers": {"count": 1, "base_port": free_port(), "python": str(python),
                    "restart_backoff": 0.1, "restart_backoff_max": 0.4,
                    "crash_loop_restarts": 3, "crash_loop_window": 60.0, **workers},
        "health": {"poll_interval": 0.3, "poll_timeout": 1.0},
        "metrics": {"port": metrics_port},
    }
    return write_config(tmp / "fake.toml", config)


def starts(tmp: Path) -> int:
    path = tmp / "starts"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_crash_loop_is_given_up(tmp_path: Path) -> None:
    port = free_port()
    supervisor = SupervisorProcess(
        scripted_config(tmp_path, fake_python(tmp_path, "exit 3"), port), tmp_path, port)
    try:
        assert supervisor.proc.wait(60) == ExitCode.SERVICE_FAILED, supervisor.log()
        assert starts(tmp_path) == 4  # the first life and 3 restarts
        statuses = [f for f in supervisor.notify.fields() if f.startswith("STATUS=")]
        assert any("given up: crash loop" in s for s in statuses), statuses
        assert "READY=1" not in supervisor.notify.fields()
        assert supervisor.notify.fields()[-2:] == ["STOPPING=1", "STATUS=stopping 1 worker(s)"]
    finally:
        supervisor.cleanup()


def test_a_failed_engine_start_is_retried_and_counted_not_a_config_error(
        tmp_path: Path) -> None:
    port = free_port()
    supervisor = SupervisorProcess(
        scripted_config(tmp_path, fake_python(tmp_path, f"exit {ExitCode.START_FAILED:d}"),
                        port), tmp_path, port)
    try:
        code = supervisor.proc.wait(60)
        log = supervisor.log()
        assert code == ExitCode.SERVICE_FAILED, log  # never 78: the config is fine
        assert starts(tmp_path) == 4  # retried, until the crash-loop limit
        assert log.count("restarting (reason start_failed)") == 3, log
        assert "given up: crash loop" in log and "last: engine failed to start" in log
    finally:
        supervisor.cleanup()


def test_config_exit_is_not_restarted(tmp_path: Path) -> None:
    port = free_port()
    supervisor = SupervisorProcess(
        scripted_config(tmp_path, fake_python(tmp_path, "exit 78"), port), tmp_path, port)
    try:
        assert supervisor.proc.wait(30) == ExitCode.CONFIG, supervisor.log()
        assert starts(tmp_path) == 1
        assert "bad config" in supervisor.log()
    finally:
        supervisor.cleanup()


def test_worker_that_never_serves_is_killed_after_start_timeout(tmp_path: Path) -> None:
    port = free_port()
    config = scripted_config(tmp_path, fake_python(tmp_path, "exec sleep 600"), port,
                             start_timeout=1.0, crash_loop_restarts=1)
    supervisor = SupervisorProcess(config, tmp_path, port)
    try:
        assert supervisor.proc.wait(60) == ExitCode.SERVICE_FAILED, supervisor.log()
        assert starts(tmp_path) == 2
        assert "start_timeout" in supervisor.log()
        supervisor.remember_children()
        assert supervisor.leftovers_after() == []
    finally:
        supervisor.cleanup()


def test_port_conflict_is_found_before_spawning(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        config = scripted_config(tmp_path, fake_python(tmp_path, "exit 0"), port,
                                 base_port=taken.getsockname()[1])
        supervisor = SupervisorProcess(config, tmp_path, port)
        try:
            assert supervisor.proc.wait(30) == ExitCode.CONFIG, supervisor.log()
            assert "workers.base_port: in use" in supervisor.log()
            assert starts(tmp_path) == 0
        finally:
            supervisor.cleanup()


def test_a_dead_workers_file_record_is_removed(tmp_path: Path) -> None:
    port = free_port()
    # The worker publishes a record, as a serving worker does, and dies without removing it.
    body = ('echo \'{"worker": 0}\' > "$DYNAMO_VLLM_DISCOVERY_DIR/fake-worker0.json"\n'
            'cp "$DYNAMO_VLLM_DISCOVERY_DIR/fake-worker0.json" ' f'{tmp_path}/published\n'
            "exit 3")
    config = scripted_config(tmp_path, fake_python(tmp_path, body), port, crash_loop_restarts=1)
    supervisor = SupervisorProcess(config, tmp_path, port)
    try:
        assert supervisor.proc.wait(60) == ExitCode.SERVICE_FAILED, supervisor.log()
        assert (tmp_path / "published").exists()
        leftovers = list(tmp_path.rglob("fake-worker0.json"))
        assert leftovers == [], leftovers
    finally:
        supervisor.cleanup()


def test_http_service_discovery_lists_the_scrape_target(tmp_path: Path) -> None:
    port = free_port()
    config = scripted_config(tmp_path, fake_python(tmp_path, "exec sleep 600"), port)
    supervisor = SupervisorProcess(config, tmp_path, port)
    try:
        groups = wait_for(lambda: supervisor.status() and httpx.get(
            supervisor.base + "/sd", timeout=3).json(), 30, what="/sd answering")
        assert groups == [{"targets": [f"127.0.0.1:{port}"],
                           "labels": {"node": socket.gethostname(),
                                      "dynamo_vllm_instance": "fake",
                                      "__meta_dynamo_vllm_model": "fake",
                                      "__meta_dynamo_vllm_workers": "1"}}]
    finally:
        supervisor.cleanup()


def test_fleet_service_discovery_through_etcd(tmp_path: Path) -> None:
    etcd = EtcdServer(tmp_path / "etcd", tmp_path / "etcd.log").start()
    port = free_port()
    config_path = scripted_config(tmp_path, fake_python(tmp_path, "exec sleep 600"), port)
    config = tomllib.loads(config_path.read_text())
    config["discovery"] = {"backend": "etcd", "etcd_endpoints": [etcd.url], "lease_ttl": 3}
    write_config(config_path, config)
    # Another node's supervisor, as it would publish itself.
    other = {"targets": ["gpu09:9400"], "labels": {"node": "gpu09",
                                                   "dynamo_vllm_instance": "llama"}}
    etcd.call("/v3/kv/put", {"key": b64("/dynamo-vllm/v1/instances-scrape-targets/gpu09/llama"),
                             "value": b64(json.dumps(other))})
    # Planted by whoever can write to etcd: relabelling labels that would send Prometheus'
    # requests elsewhere. Refused and logged, never republished.
    planted = {"targets": ["gpu10:9400"], "labels": {"__metrics_path__": "/steal",
                                                     "__scheme__": "https"}}
    etcd.call("/v3/kv/put", {"key": b64("/dynamo-vllm/v1/instances-scrape-targets/gpu10/x"),
                             "value": b64(json.dumps(planted))})
    supervisor = SupervisorProcess(config_path, tmp_path, port)
    try:
        def fleet() -> list | None:
            try:
                groups = httpx.get(supervisor.base + "/sd?scope=fleet", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return None
            return groups if len(groups) == 2 else None
        groups = wait_for(fleet, 30, what="both target groups in /sd?scope=fleet")
        assert other in groups and planted not in groups
        assert "refused a target group read from etcd: label '__metrics_path__' is reserved" \
            in supervisor.log()
        ours = next(g for g in groups if g != other)
        assert ours["targets"] == [f"127.0.0.1:{port}"]
        assert ours["labels"]["node"] == socket.gethostname()
        # etcd down: a 503 naming it (Prometheus keeps its last good list), never a 500.
        # (A successful read answers for 5 s: a flood of requests is one etcd query.)
        etcd.stop()

        def refused() -> httpx.Response | None:
            answer = httpx.get(supervisor.base + "/sd?scope=fleet", timeout=10)
            return answer if answer.status_code != 200 else None
        down = wait_for(refused, 30, interval=1, what="/sd?scope=fleet without etcd")
        assert down.status_code == 503 and "etcd" in down.json()["error"]
        assert httpx.get(supervisor.base + "/sd", timeout=5).status_code == 200
        etcd.start()
        supervisor.proc.terminate()
        assert supervisor.proc.wait(60) == ExitCode.STOPPED
        # A clean stop takes our target out; the other node's stays.
        left = etcd.get_prefix("/dynamo-vllm/v1/instances-scrape-targets/")[0]
        assert sorted(left) == ["/dynamo-vllm/v1/instances-scrape-targets/gpu09/llama",
                                "/dynamo-vllm/v1/instances-scrape-targets/gpu10/x"]
    finally:
        supervisor.cleanup()
        etcd.stop()
