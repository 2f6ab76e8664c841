"""Checkpoint/restore with the real engine and real CRIU (4.2, from scripts/install-criu).

1. The worker's side, with the test as the checkpointer (the DaemonSet's part in Dynamo):
   the ready marker, restore-complete (environment refreshed, serving, registered), a
   checkpoint asked for while serving, and snapshot-complete (exit with CHECKPOINTED).
2. The supervisor's side: a checkpoint that fails on a full store (nothing left behind, the
   worker serves cold), one taken on request (the worker is restored and answers as before),
   the same request again (nothing taken), a worker killed (restored, not cold-started),
   `dynamo-vllm restore`, and a worker left waiting at its ready marker while no supervisor ran
   (found by the start scan, dumped and restored as the new supervisor's child).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dynamo_vllm.contract.protocol import Env, ExitCode, Marker
from tests.harness import (
    SupervisorProcess,
    WorkerProcess,
    engine_config,
    free_port,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.engine

PROMPT = {"model": "tiny", "prompt": "checkpoint me", "max_tokens": 12, "temperature": 0}


def complete(base: str) -> str:
    resp = httpx.post(base + "/v1/completions", json=PROMPT, timeout=60)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["choices"][0]["text"])


def wait_marker(directory: Path, name: str, timeout: float) -> dict:
    path = directory / name
    wait_for(lambda: path.exists(), timeout, interval=0.1, what=f"{name} in {directory}")
    return json.loads(path.read_text())


def test_worker_side_with_the_test_as_checkpointer(tiny_model: Path, tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.mkdir(mode=0o700)
    records = tmp_path / "endpoints"
    records.mkdir()
    port = free_port()
    config = write_config(tmp_path / "w.toml", engine_config(
        tiny_model, port, health={"canary": False}, checkpoint={"timeout": 120.0},
        discovery={"path": str(records)}))
    worker = WorkerProcess(config, port, tmp_path / "worker.log", env={
        Env.SNAPSHOT_CONTROL_DIR: str(control), Env.CHECKPOINT_HASH: "test-hash-1",
        Env.INSTANCE: "before"})
    try:
        ready = wait_marker(control, Marker.READY, 180)
        assert ready["pid"] == worker.proc.pid and ready["hash"] == "test-hash-1"
        code, body = worker.health() or (0, {})
        assert (code, body.get("state")) == (503, "checkpoint")
        assert not list(records.iterdir()), "published before the checkpointer answered"

        # Restored: a new identity comes from the context; names off the list are ignored.
        (control / Marker.RESTORE_CONTEXT).write_text(json.dumps(
            {"env": {Env.INSTANCE: "after", "PATH_NOT_ALLOWED": "/evil"}}))
        (control / Marker.RESTORE_COMPLETE).write_text("restored")
        worker.wait_serving(60)
        assert complete(worker.base)
        published = [json.loads(p.read_text()) for p in records.iterdir()]
        assert [r["instance"] for r in published] == ["after"], published
        assert not any((control / name).exists() for name in Marker.ALL)
        assert "PATH_NOT_ALLOWED is not allow-listed" in worker.log()

        # Asked for a checkpoint while serving: out of discovery, paused, ready again.
        resp = httpx.post(worker.base + "/engine/snapshot", timeout=30)
        assert resp.status_code == 202, resp.text
        again = wait_marker(control, Marker.READY, 60)
        assert again["pid"] == worker.proc.pid
        assert worker.health()[1]["state"] == "checkpoint"  # type: ignore[index]
        wait_for(lambda: not list(records.iterdir()), 10, what="unregistered")
        (control / Marker.SNAPSHOT_COMPLETE).write_text("done")
        assert worker.wait_exit(60) == ExitCode.CHECKPOINTED
        assert worker.leftovers_after() == []
    finally:
        worker.cleanup()


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    """A store on a tmpfs too small for a dump; remount it bigger to let one through."""
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(store)],
                   check=True, timeout=30)
    try:
        yield store
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False, timeout=30)


def test_supervisor_checkpoints_and_restores(tiny_model: Path, tmp_path: Path, criu: Path,
                                             small_store: Path) -> None:
    metrics_port, port = free_port(), free_port()
    config = write_config(tmp_path / "tiny.toml", engine_config(
        tiny_model, port, metrics={"port": metrics_port},
        workers={"restart_backoff": 0.5, "stop_timeout": 30.0},
        health={"poll_interval": 1.0, "canary_idle": 30.0},
        checkpoint={"enabled": True, "store": str(small_store), "criu": str(criu),
                    "timeout": 120.0}))
    supervisor = SupervisorProcess(config, tmp_path, metrics_port)
    cli = [sys.executable, "-m", "dynamo_vllm.cli.main"]
    env = supervisor.cli_env()
    base = f"http://127.0.0.1:{port}"
    try:
        # 1. The automatic checkpoint after the cold start fails on the full store.
        supervisor.wait_workers(lambda ws: ws[0]["state"] == "serving", 240, "serving, cold")
        assert 'dynamo_agent_checkpoints_total{result="failed",worker="0"} 1.0' in \
            supervisor.metrics()
        assert "no space left" in supervisor.log().lower() or "No space" in supervisor.log()
        assert os.listdir(small_store / "tmp") == [], "a failed checkpoint left files"
        assert [e for e in os.listdir(small_store) if e not in ("tmp", "locks")] == []
        cold = complete(base)

        # 2. Room on the store, and a checkpoint on request: taken, then restored at once.
        subprocess.run(["mount", "-o", "remount,size=4g", str(small_store)], check=True,
                       timeout=30)
        out = subprocess.run([*cli, "checkpoint", str(config)], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0 and "taken" in out.stdout, out.stdout + out.stderr
        supervisor.wait_workers(lambda ws: ws[0]["state"] == "serving" and ws[0]["restored"],
                                60, "restored after the checkpoint")
        assert complete(base) == cold, "the restored engine answers differently"
        listing = subprocess.run([*cli, "checkpoints", str(config)], env=env, capture_output=True,
                                 text=True, timeout=60)
        assert "current" in listing.stdout, listing.stdout + listing.stderr
        assert oct(os.stat(small_store).st_mode & 0o777) == "0o700"

        # 3. Idempotent: asked again, nothing is taken.
        out = subprocess.run([*cli, "checkpoint", str(config)], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and "stored already" in out.stdout, out.stdout

        # 4. A killed worker comes back from the checkpoint, not cold.
        os.killpg(supervisor.worker(0)["pid"], signal.SIGKILL)
        restored_twice = 'dynamo_agent_restores_total{result="restored",worker="0"} 2.0'
        wait_for(lambda: restored_twice in supervisor.metrics(), 60, what="a second restore")
        supervisor.wait_workers(lambda ws: ws[0]["state"] == "serving" and ws[0]["restored"],
                                30, "restored after a kill")
        assert complete(base) == cold
        metrics = supervisor.metrics()
        assert 'dynamo_agent_restores_total{result="cold_start",worker="0"} 0.0' in metrics
        assert 'dynamo_agent_worker_restored{worker="0"} 1.0' in metrics
        assert "dynamo_agent_restore_duration_seconds" in metrics

        # 5. Restored on request: stopped gracefully, back from the checkpoint.
        out = subprocess.run([*cli, "restore", str(config), "--json"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        restored = json.loads(out.stdout)
        assert [(r["worker"], r["outcome"], r["restored"]) for r in restored] == \
            [(0, "serving", True)], restored
        assert 'dynamo_agent_restores_total{result="restored",worker="0"} 3.0' in \
            supervisor.metrics()
        assert complete(base) == cold

        # 6. The supervisor stops; a worker is left waiting at its ready marker (as if the
        # supervisor had died mid-checkpoint); the next supervisor's start scan finds it.
        checkpoint_hash = supervisor.worker(0)["checkpoint_hash"]
        supervisor.proc.send_signal(signal.SIGTERM)
        assert supervisor.proc.wait(60) == 0
        assert supervisor.leftovers_after() == []
        for entry in os.listdir(small_store):
            if entry not in ("tmp", "locks"):
                subprocess.run(["rm", "-rf", str(small_store / entry)], check=True, timeout=30)
        runtime = tmp_path / "runtime"
        control = runtime / "control" / "0"
        waiting = WorkerProcess(runtime / "config.toml", port, tmp_path / "waiting.log", env={
            Env.SNAPSHOT_CONTROL_DIR: str(control), Env.CONTROL_DIR: str(control),
            Env.CHECKPOINT_HASH: checkpoint_hash,
            Env.PROMETHEUS_MULTIPROC_DIR: str(runtime / "metrics" / "worker0")})
        try:
            wait_marker(control, Marker.READY, 180)
            # Reaped at once when the dump ends it, as init would: a restore needs its pid.
            threading.Thread(target=waiting.proc.wait, daemon=True).start()
            supervisor.notify.close()
            (tmp_path / "notify.sock").unlink()
            second = SupervisorProcess(config, tmp_path, metrics_port)
            try:
                second.wait_workers(lambda ws: ws[0]["state"] == "serving" and ws[0]["restored"],
                                    120, "the waiting worker restored by the new supervisor")
                assert "found waiting at its ready marker" in second.log()
                assert waiting.proc.returncode == -signal.SIGKILL  # ended by the dump
                assert complete(base) == cold
                second.proc.send_signal(signal.SIGTERM)
                assert second.proc.wait(60) == 0
                assert second.leftovers_after() == []
            finally:
                second.cleanup()
        finally:
            waiting.cleanup()
    finally:
        supervisor.cleanup()
