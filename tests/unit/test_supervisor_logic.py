"""The supervisor's decisions, without processes: backoff, crash loops, devices, notify."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest

from dynamo_vllm.contract.protocol import ExitCode
from dynamo_vllm.supervisor.devices import GpuAssignmentError, assign, split_cpus
from dynamo_vllm.supervisor.notify import Notifier, watchdog_usec
from dynamo_vllm.supervisor.restart_policy import RestartPolicy, restart_reason
from dynamo_vllm.supervisor.worker_process import WorkerSpec
from tests.harness.basics import FakeClock


def test_backoff_doubles_with_jitter_and_caps() -> None:
    policy = RestartPolicy(initial=1.0, maximum=8.0, rng=random.Random(1))
    assert policy.next_delay() == 0.0
    delays = []
    for _ in range(6):
        policy.record_failure()
        delays.append(policy.next_delay())
    for delay, base in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert 0.8 * base <= delay <= 1.2 * base
    policy.record_success()
    policy.record_failure()
    assert 0.8 <= policy.next_delay() <= 1.2


def test_crash_loop_counts_only_within_the_window() -> None:
    clock = FakeClock()
    policy = RestartPolicy(max_restarts=3, window=60.0, clock=clock)
    for _ in range(3):
        policy.record_failure()
        clock.now += 10
    assert not policy.crash_looping
    clock.now += 100  # the old failures leave the window
    policy.record_failure()
    assert not policy.crash_looping and policy.recent_failures == 1
    for _ in range(3):
        policy.record_failure()
    assert policy.crash_looping


@pytest.mark.parametrize(("code", "killed_for", "reason"), [
    (ExitCode.ENGINE_DEAD, None, "engine_dead"),
    (ExitCode.UNHEALTHY, None, "engine_hung"),
    (ExitCode.STOPPED, None, "exited"),
    (ExitCode.START_FAILED, None, "start_failed"),
    (1, None, "crashed"),
    (-9, None, "killed"),
    (-9, "worker_hung", "worker_hung"),
])
def test_restart_reasons(code: int, killed_for: str | None, reason: str) -> None:
    assert restart_reason(code, killed_for) == reason


def test_gpu_assignment() -> None:
    assert assign(2, 2, [0, 1, 2, 3]) == [[0, 1], [2, 3]]
    assert assign(2, 0, []) == [[], []]
    with pytest.raises(GpuAssignmentError, match="need 4 GPUs, but only 3"):
        assign(2, 2, [0, 1, 2])


def test_cpu_split() -> None:
    assert split_cpus(2, [0, 1]) == [[0], [1]]
    assert split_cpus(2, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3]]
    assert split_cpus(4, [0, 1]) == [[], [], [], []]


def test_worker_environment_is_scrubbed(tmp_path: Path) -> None:
    spec = WorkerSpec(index=1, host="127.0.0.1", port=8101, gpus=[2, 3], cpus=[1],
                      metrics_dir=tmp_path / "m", python="", config_path=tmp_path / "c.toml")
    env = spec.environment({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1",
                            "PATH": "/bin"})
    assert "NOTIFY_SOCKET" not in env and "WATCHDOG_USEC" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == env["DYNAMO_VLLM_WORKER_CPUS"] == "1"
    assert env["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "m")
    assert env["DYNAMO_VLLM_SUPERVISOR_PID"] == str(os.getpid())
    assert spec.command()[-4:] == ["--config", str(tmp_path / "c.toml"), "--index", "1"]
    operator_bind = spec.environment({"VLLM_CPU_OMP_THREADS_BIND": "0-3"})
    assert operator_bind["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"
    assert "DYNAMO_VLLM_WORKER_CPUS" not in operator_bind


def test_watchdog_usec_rules() -> None:
    assert watchdog_usec({"WATCHDOG_USEC": "30000000"}, 5) == 30_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "6"}, 5) is None
    assert watchdog_usec({"WATCHDOG_USEC": "x"}, 5) is None
    assert watchdog_usec({}, 5) is None


def test_notifier_sends_to_a_real_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(2)
    try:
        notifier = Notifier()
        assert notifier.watchdog_interval == 2.0
        notifier.ready("1/1 workers serving")
        notifier.status("1/1 workers serving")  # unchanged: not sent again
        notifier.watchdog()
        notifier.reloading("reloading")
        got = [receiver.recv(4096).decode() for _ in range(3)]
        assert got[0] == "READY=1\nSTATUS=1/1 workers serving"
        assert got[1] == "WATCHDOG=1"
        assert got[2].startswith("RELOADING=1\nMONOTONIC_USEC=")
    finally:
        receiver.close()


def test_notifier_without_systemd_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    notifier = Notifier()
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("x")
    notifier.watchdog()
