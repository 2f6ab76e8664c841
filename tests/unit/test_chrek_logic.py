"""The supervisor's checkpoint state machine, with a checkpointer that records what it is
asked (logic only: tests/integration/test_checkpoint_restore.py runs CRIU for real)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from dynamo_vllm.contract.config import from_dict
from dynamo_vllm.contract.protocol import Env, Marker
from dynamo_vllm.supervisor.checkpoint import coordinator as chrek
from dynamo_vllm.supervisor.checkpoint.coordinator import CheckpointCoordinator
from dynamo_vllm.supervisor.checkpoint.criu import CheckpointError, DumpResult
from dynamo_vllm.supervisor.metrics import CheckpointMetrics
from dynamo_vllm.supervisor.restart_policy import RestartPolicy
from dynamo_vllm.supervisor.worker_process import WorkerSpec
from dynamo_vllm.supervisor.workers import WorkerHandle


class RecordingCheckpointer:
    name = "recording"

    def __init__(self, fail_dump: bool = False, unavailable: str | None = None):
        self.fail_dump = fail_dump
        self.unavailable = unavailable
        self.dumps: list[int] = []

    def check(self) -> str | None:
        return self.unavailable

    async def dump(self, pid: int, images: Path, leave_running: bool) -> DumpResult:
        self.dumps.append(pid)
        if self.fail_dump:
            (images / "dump.log").write_text("(0.1) Error (criu/x.c:1): No space left\n")
            raise CheckpointError("criu dump failed (criu exit 1): No space left")
        (images / "pages-1.img").write_bytes(b"p" * 100)
        return DumpResult(0.01, [], {"1": "pipe:[1]"})

    async def restore(self, images: Path, work_dir: Path, stdio: dict[str, str]) -> int:
        raise CheckpointError("not in unit tests")


def make(tmp_path: Path, checkpointer: RecordingCheckpointer, **checkpoint: object
         ) -> tuple[CheckpointCoordinator, WorkerHandle, CheckpointMetrics]:
    model = tmp_path / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text("{}")
    config = from_dict({"model": {"path": str(model)},
                        "checkpoint": {"enabled": True, "store": str(tmp_path / "store"),
                                       **checkpoint}}, check_paths=False)
    metrics = CheckpointMetrics(CollectorRegistry())
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    coordinator = CheckpointCoordinator(config, runtime, "tiny", metrics, checkpointer)
    spec = WorkerSpec(index=0, host="127.0.0.1", port=8100, gpus=[], cpus=[],
                      metrics_dir=runtime / "metrics" / "worker0", python="",
                      config_path=runtime / "config.toml", instance="tiny",
                      socket_dir=runtime / "sockets" / "worker0")
    handle = WorkerHandle(spec=spec, policy=RestartPolicy(1, 2, 3, 10))
    handle.fresh_life_dirs()
    handle.pid = os.getpid()

    async def prepare() -> None:
        await coordinator.prepare([spec], {})
        coordinator.watch(handle)

    asyncio.run(prepare())
    coordinator.stop()
    return coordinator, handle, metrics


def count(metrics: CheckpointMetrics, name: str, **labels: str) -> float:
    metric = getattr(metrics, name)
    return float((metric.labels(**labels) if labels else metric)._value.get())


@pytest.fixture(autouse=True)
def not_a_subreaper(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test process must not adopt orphans: later tests need their pids freed."""
    monkeypatch.setattr(chrek, "become_subreaper", lambda: None)


def test_a_cold_start_is_asked_for_a_checkpoint_once(tmp_path: Path) -> None:
    coordinator, handle, _ = make(tmp_path, RecordingCheckpointer())
    env = coordinator.spawn_env(handle.spec)
    assert env[Env.SNAPSHOT_CONTROL_DIR] == env[Env.CONTROL_DIR] == str(handle.spec.control_dir)
    assert len(env[Env.CHECKPOINT_HASH]) == 32
    result = asyncio.run(coordinator.take(handle.spec, os.getpid(), leave_running=False))
    assert result["result"] == "taken"
    assert coordinator.can_restore(handle.spec)
    assert Env.SNAPSHOT_CONTROL_DIR not in coordinator.spawn_env(handle.spec)
    again = asyncio.run(coordinator.take(handle.spec, os.getpid(), leave_running=False))
    assert again["result"] == "skipped"


def test_no_snapshot_mode_when_auto_is_off_or_criu_cannot_work(tmp_path: Path) -> None:
    coordinator, handle, _ = make(tmp_path / "a", RecordingCheckpointer(), auto=False)
    assert Env.SNAPSHOT_CONTROL_DIR not in coordinator.spawn_env(handle.spec)
    coordinator, handle, metrics = make(tmp_path / "b", RecordingCheckpointer(
        unavailable="`criu check` failed: vdso"))
    assert Env.SNAPSHOT_CONTROL_DIR not in coordinator.spawn_env(handle.spec)
    assert count(metrics, "available") == 0
    assert "unavailable" in coordinator.last_event


def test_a_failed_dump_leaves_nothing_and_tells_the_worker_to_serve(tmp_path: Path) -> None:
    checkpointer = RecordingCheckpointer(fail_dump=True)
    coordinator, handle, metrics = make(tmp_path, checkpointer)
    control = handle.spec.control_dir
    assert control is not None
    (control / Marker.READY).write_text(json.dumps({"pid": handle.pid,
                                                    "hash": handle.spec.checkpoint_hash}))
    asyncio.run(coordinator._on_ready(handle))
    assert checkpointer.dumps == [handle.pid]
    assert (control / Marker.RESTORE_COMPLETE).exists()
    context = json.loads((control / Marker.RESTORE_CONTEXT).read_text())["env"]
    assert context[Env.SUPERVISOR_PID] == str(os.getpid())
    assert os.listdir(tmp_path / "store" / "tmp") == []
    assert not coordinator.can_restore(handle.spec)
    assert count(metrics, "checkpoints", worker="0", result="failed") == 1
    kept = list((tmp_path / "runtime" / "criu" / "0").glob("dump-failed-*.log"))
    assert kept and "No space left" in kept[0].read_text()


@pytest.mark.parametrize("content", [b"garbage", b'{"pid": 1, "hash": "h"}'])
def test_malformed_ready_markers_are_ignored_safely(tmp_path: Path, content: bytes) -> None:
    checkpointer = RecordingCheckpointer()
    coordinator, handle, metrics = make(tmp_path, checkpointer)
    control = handle.spec.control_dir
    assert control is not None
    (control / Marker.READY).write_bytes(content)
    asyncio.run(coordinator._on_ready(handle))
    assert checkpointer.dumps == []
    assert count(metrics, "marker_errors") == 1


def test_a_symlinked_ready_marker_is_refused(tmp_path: Path) -> None:
    checkpointer = RecordingCheckpointer()
    coordinator, handle, metrics = make(tmp_path, checkpointer)
    control = handle.spec.control_dir
    assert control is not None
    target = tmp_path / "elsewhere"
    target.write_text(json.dumps({"pid": handle.pid, "hash": handle.spec.checkpoint_hash}))
    (control / Marker.READY).symlink_to(target)
    asyncio.run(coordinator._on_ready(handle))
    assert checkpointer.dumps == [] and count(metrics, "marker_errors") == 1
    assert target.exists()  # never followed, never removed


def test_a_stale_marker_of_a_dead_worker_is_cleared_at_start(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    (runtime / "control" / "0").mkdir(parents=True, mode=0o700)
    (runtime / "control" / "0" / Marker.READY).write_text(
        json.dumps({"pid": 2**22 + 12345, "hash": "old"}))
    checkpointer = RecordingCheckpointer()
    make(tmp_path, checkpointer)
    assert checkpointer.dumps == []
    assert not (runtime / "control" / "0" / Marker.READY).exists()


def test_operator_requests(tmp_path: Path) -> None:
    coordinator, _, _ = make(tmp_path, RecordingCheckpointer())

    async def requests() -> list[tuple[int, dict]]:
        return [await coordinator.request_checkpoint("7"),
                await coordinator.request_checkpoint("0"),
                coordinator.request_restore("0")]

    missing, not_serving, no_checkpoint = asyncio.run(requests())
    assert missing[0] == 404
    assert not_serving[0] == 409 and "a checkpoint is taken while it serves" in \
        not_serving[1]["error"]
    assert no_checkpoint[0] == 409 and "no checkpoint stored" in no_checkpoint[1]["error"]


def test_after_a_failed_restore_no_automatic_checkpoint_of_that_hash(tmp_path: Path) -> None:
    # Else a host where restores fail cold starts, dumps and fails to restore forever.
    coordinator, handle, metrics = make(tmp_path, RecordingCheckpointer())
    asyncio.run(coordinator.take(handle.spec, os.getpid(), leave_running=False))
    with pytest.raises(CheckpointError):
        asyncio.run(coordinator.restore(handle))
    coordinator.restore_failed(handle, CheckpointError("criu restore failed: timens"))
    assert count(metrics, "restores", worker="0", result="cold_start") == 1
    assert not coordinator.can_restore(handle.spec)
    assert Env.SNAPSHOT_CONTROL_DIR not in coordinator.spawn_env(handle.spec)
    assert "restore failed" in coordinator.last_event


def test_each_life_gets_an_empty_private_socket_directory_at_the_same_path(
        tmp_path: Path) -> None:
    # A checkpoint holds the KV event socket's path; the restore binds it there again, so
    # the directory must exist, and hold no socket file of an earlier life.
    _, handle, _ = make(tmp_path, RecordingCheckpointer())
    sockets = handle.spec.socket_dir
    assert sockets is not None
    (sockets / "events").write_text("an earlier life's socket")
    handle.fresh_life_dirs()
    assert sockets.is_dir() and list(sockets.iterdir()) == []
    assert sockets.stat().st_mode & 0o777 == 0o700
    assert handle.spec.environment({})[Env.SOCKET_DIR] == str(sockets)
