"""Every task is observed: an exception is logged with its traceback and handled (a worker's
supervision gives the worker up, a reload ends with READY=1 and says it failed)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from dynamo_vllm.contract.config import from_dict
from dynamo_vllm.supervisor import reload as reload_module
from dynamo_vllm.supervisor.checkpoint.store import StoreError
from dynamo_vllm.supervisor.daemon import Supervisor
from dynamo_vllm.supervisor.phases import IllegalTransition, Phase
from dynamo_vllm.supervisor.tasks import observed
from dynamo_vllm.supervisor.worker_process import WorkerSpec


class RecordingNotifier:
    watchdog_interval = None
    watchdog_pings = 0

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def __getattr__(self, kind: str) -> Any:
        return lambda text="", *args: self.sent.append((kind, str(text)))


def test_a_task_that_raises_is_logged_and_handled(caplog: pytest.LogCaptureFixture) -> None:
    handled: list[BaseException] = []

    async def broken() -> None:
        raise RuntimeError("boom")

    async def main() -> None:
        task = observed(broken(), "broken-task", handled.append)
        with pytest.raises(RuntimeError):
            await task
        await asyncio.sleep(0)  # the done-callback runs on the loop

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert [type(e) for e in handled] == [RuntimeError]
    record = next(r for r in caplog.records if "broken-task" in r.getMessage())
    assert record.exc_info is not None and "boom" in record.getMessage()


def test_a_cancelled_task_is_no_failure(caplog: pytest.LogCaptureFixture) -> None:
    handled: list[BaseException] = []

    async def main() -> None:
        task = observed(asyncio.sleep(10), "sleeper", handled.append)
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)

    asyncio.run(main())
    assert handled == []


def supervisor(tmp_path: Path) -> tuple[Supervisor, RecordingNotifier]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    config = from_dict({"model": {"path": str(model)}}, check_paths=False)
    notifier = RecordingNotifier()
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    return Supervisor(config, runtime, tmp_path / "c.toml", notifier=notifier), notifier


def test_a_bug_in_a_worker_s_supervision_gives_the_worker_up(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    service, _ = supervisor(tmp_path)

    async def buggy(handle: Any, service: Any) -> None:
        handle.stopping()  # an illegal move: nothing runs

    monkeypatch.setattr("dynamo_vllm.supervisor.daemon.supervise", buggy)
    spec = WorkerSpec(index=0, host="127.0.0.1", port=8100, gpus=[], cpus=[],
                      metrics_dir=tmp_path / "m", python="", config_path=tmp_path / "c")

    async def main() -> None:
        handle = service.add_worker(spec)
        with pytest.raises(IllegalTransition):
            await service.tasks[0]
        await asyncio.sleep(0)
        assert handle.phase is Phase.FAILED
        assert "supervisor error: IllegalTransition" in handle.failed_reason

    asyncio.run(main())


def test_a_reload_that_fails_ends_with_ready_and_says_so(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    service, notifier = supervisor(tmp_path)

    async def store_broken(supervisor: Any) -> bool:
        raise StoreError("/var/lib/dynamo-vllm/checkpoints is a symlink (refused)")

    monkeypatch.setattr(reload_module, "_apply", store_broken)
    asyncio.run(reload_module.reload(service))
    assert notifier.sent[0] == ("reloading", "reloading the config")
    kind, text = notifier.sent[-1]
    assert kind == "ready" and text.startswith("reload failed (StoreError: ")


def test_a_refused_reload_keeps_the_previous_config(tmp_path: Path) -> None:
    service, notifier = supervisor(tmp_path)
    (tmp_path / "c.toml").write_text("[workers]\ncount = 'two'\n")
    asyncio.run(reload_module.reload(service))
    kind, text = notifier.sent[-1]
    assert kind == "ready" and text.startswith("reload refused (")
    assert "workers.count" in text and service.config.workers.count == 1
