"""Dynamo's environment-variable checkpoint protocols (signal files, Unix signals), accepted
beside the control directory: the settings, the early exit, and every answer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from dynamo_vllm.agent import chrek_env
from dynamo_vllm.agent.chrek_env import (
    EnvProtocol,
    Verdict,
    checkpoint_already_taken,
    env_checkpoint,
    wait_env_checkpointer,
)
from dynamo_vllm.agent.snapshot import (
    Outcome,
    SnapshotConfigError,
    settings_from_env,
    wait_for_checkpointer,
)


def signal_file_env(tmp_path: Path) -> dict[str, str]:
    return {"DYN_CHECKPOINT_SIGNAL_FILE": str(tmp_path / "signal.done"),
            "DYN_READY_FOR_CHECKPOINT_FILE": str(tmp_path / "ready"),
            "DYN_CHECKPOINT_STORAGE_TYPE": "pvc",
            "DYN_CHECKPOINT_LOCATION": str(tmp_path / "store"),
            "DYN_RESTORE_MARKER_FILE": str(tmp_path / "dynamo-restored")}


def test_the_signal_file_protocol_needs_its_five_names(tmp_path: Path) -> None:
    spec, problems = env_checkpoint(signal_file_env(tmp_path))
    assert problems == [] and spec is not None and spec.protocol is EnvProtocol.SIGNAL_FILE
    partial = {"DYN_CHECKPOINT_SIGNAL_FILE": "/x/signal"}
    spec, problems = env_checkpoint(partial)
    assert spec is None and "DYN_READY_FOR_CHECKPOINT_FILE" in problems[0] \
        and "DYN_RESTORE_MARKER_FILE" in problems[0]
    relative = {**signal_file_env(tmp_path), "DYN_RESTORE_MARKER_FILE": "restored"}
    assert "DYN_RESTORE_MARKER_FILE: restored is not an absolute path" in \
        env_checkpoint(relative)[1]
    with pytest.raises(SnapshotConfigError, match="DYN_READY_FOR_CHECKPOINT_FILE"):
        settings_from_env(partial, timeout=5, sleep_level=1)


def test_the_signals_protocol_needs_only_the_ready_file(tmp_path: Path) -> None:
    spec, problems = env_checkpoint({"DYN_READY_FOR_CHECKPOINT_FILE": str(tmp_path / "r")})
    assert problems == [] and spec is not None and spec.protocol is EnvProtocol.UNIX_SIGNALS
    assert env_checkpoint({}) == (None, [])
    settings = settings_from_env({"DYN_READY_FOR_CHECKPOINT_FILE": str(tmp_path / "r")},
                                 timeout=5, sleep_level=1)
    assert settings is not None and settings.at_start and settings.env_protocol == spec


def test_a_done_checkpoint_skips_the_model_load(tmp_path: Path) -> None:
    spec, _ = env_checkpoint(signal_file_env(tmp_path))
    assert spec is not None
    assert not checkpoint_already_taken(spec)
    store = tmp_path / "store"
    store.mkdir()
    (store / "checkpoint.done").write_text(json.dumps({"success": True}))
    assert checkpoint_already_taken(spec)
    for stale in ('{"success": false}', "not json", '{"success": "yes"}'):
        (store / "checkpoint.done").write_text(stale)
        assert not checkpoint_already_taken(spec), stale
    (store / "checkpoint.done").unlink()
    (tmp_path / "elsewhere").write_text(json.dumps({"success": True}))
    (store / "checkpoint.done").symlink_to(tmp_path / "elsewhere")
    assert not checkpoint_already_taken(spec)  # never through a symlink


@pytest.fixture
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chrek_env, "POLL_S", 0.01)


async def answer_later(delay: float, action: object) -> None:
    await asyncio.sleep(delay)
    action()  # type: ignore[operator]


def run_wait(spec: chrek_env.EnvCheckpoint, action: object, timeout: float = 5.0
             ) -> Verdict:
    async def scenario() -> Verdict:
        task = asyncio.ensure_future(answer_later(0.1, action))
        verdict, _ = await wait_env_checkpointer(spec, timeout)
        await task
        return verdict
    return asyncio.run(asyncio.wait_for(scenario(), 20))


@pytest.mark.usefixtures("fast_polls")
def test_signal_files_answer_restored_checkpointed_or_failed(tmp_path: Path) -> None:
    spec, _ = env_checkpoint(signal_file_env(tmp_path))
    assert spec is not None
    seen_ready: list[bool] = []

    def restored() -> None:
        seen_ready.append((tmp_path / "ready").read_text() == "ready")
        (tmp_path / "dynamo-restored").write_text("restored")
    assert run_wait(spec, restored) is Verdict.RESTORED
    assert seen_ready == [True] and not (tmp_path / "ready").exists()
    (tmp_path / "dynamo-restored").unlink()

    signal_file = tmp_path / "signal.done"
    signal_file.write_text('{"success": true}')  # stale: from an earlier attempt
    assert run_wait(spec, restored) is Verdict.RESTORED
    assert run_wait(spec, lambda: signal_file.write_text(json.dumps(
        {"success": True, "checkpoint_id": "c1"}))) is Verdict.CHECKPOINTED
    assert run_wait(spec, lambda: signal_file.write_text(json.dumps(
        {"success": False, "error": "disk full"}))) is Verdict.FAILED
    # Malformed: reported and ignored, so the wait runs to its end.
    assert run_wait(spec, lambda: signal_file.write_text("{"), timeout=0.5) is Verdict.TIMED_OUT


def test_unix_signals_answer_checkpointed_restored_or_failed(tmp_path: Path) -> None:
    spec, _ = env_checkpoint({"DYN_READY_FOR_CHECKPOINT_FILE": str(tmp_path / "ready")})
    assert spec is not None
    for signum, verdict in ((signal.SIGUSR1, Verdict.CHECKPOINTED),
                            (signal.SIGCONT, Verdict.RESTORED),
                            (signal.SIGUSR2, Verdict.FAILED)):
        assert run_wait(spec, lambda s=signum: os.kill(os.getpid(), s)) is verdict
        assert not (tmp_path / "ready").exists()
    assert run_wait(spec, lambda: None, timeout=0.3) is Verdict.TIMED_OUT
    # The handlers are gone afterwards: SIGUSR2's default would end this process, so check
    # the installed handler instead of sending it.
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.default_int_handler)


@pytest.mark.usefixtures("fast_polls")
def test_the_worker_wait_maps_env_answers_to_outcomes(tmp_path: Path) -> None:
    settings = settings_from_env(signal_file_env(tmp_path), timeout=5, sleep_level=1)
    assert settings is not None and settings.env_protocol is not None

    async def scenario() -> Outcome:
        task = asyncio.ensure_future(answer_later(0.1, lambda: (tmp_path / "signal.done")
                                                  .write_text('{"success": false}')))
        answer = await wait_for_checkpointer(settings, 0)
        await task
        return answer.outcome
    # A failed checkpoint leaves the process serving, as no answer does.
    assert asyncio.run(asyncio.wait_for(scenario(), 20)) is Outcome.TIMED_OUT
