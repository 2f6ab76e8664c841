"""The worker's side of checkpoint/restore: settings, markers, restore context, waiting."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from dynamo_vllm.agent import snapshot
from dynamo_vllm.agent.snapshot import Outcome, SnapshotConfigError, settings_from_env
from dynamo_vllm.contract import markers
from dynamo_vllm.contract.markers import (
    MarkerError,
    hash_problem,
    parse_ready,
    parse_restore_context,
    read_marker,
)
from dynamo_vllm.contract.protocol import Env, Marker


@pytest.fixture
def control(tmp_path: Path) -> Path:
    directory = tmp_path / "control"
    directory.mkdir(mode=0o700)
    return directory


def settings(environ: dict[str, str]) -> snapshot.SnapshotSettings | None:
    return settings_from_env(environ, timeout=5.0, sleep_level=1)


def test_off_without_a_control_directory() -> None:
    assert settings({}) is None


def test_seed_names_without_a_control_directory_are_an_error() -> None:
    with pytest.raises(SnapshotConfigError) as caught:
        settings({"DYN_CHECKPOINT_LOCATION": "/c", "DYN_CHECKPOINT_HASH": "h"})
    assert "DYN_CHECKPOINT_HASH, DYN_CHECKPOINT_LOCATION set" in caught.value.errors[0]
    assert Env.SNAPSHOT_CONTROL_DIR in caught.value.errors[0]


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    with pytest.raises(SnapshotConfigError) as caught:
        settings({Env.SNAPSHOT_CONTROL_DIR: str(tmp_path / "missing")})
    errors = caught.value.errors
    assert len(errors) == 2
    assert errors[0].startswith(f"{Env.SNAPSHOT_CONTROL_DIR}: ") and "No such file" in errors[0]
    assert errors[1].startswith(f"{Env.CHECKPOINT_HASH}: required")


@pytest.mark.parametrize("bad", ["../x", "a/b", "a\\b", "..", "x" * 200, "-lead"])
def test_hashes_that_would_be_paths_are_refused(bad: str) -> None:
    assert hash_problem(bad)
    with pytest.raises(SnapshotConfigError, match=Env.CHECKPOINT_HASH):
        settings({Env.CHECKPOINT_HASH: bad, Env.SNAPSHOT_CONTROL_DIR: "/nonexistent"})


def test_a_symlinked_or_open_control_directory_is_refused(tmp_path: Path, control: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(control)
    with pytest.raises(SnapshotConfigError, match="symlink"):
        settings({Env.SNAPSHOT_CONTROL_DIR: str(link), Env.CHECKPOINT_HASH: "h"})
    os.chmod(control, 0o777)
    with pytest.raises(SnapshotConfigError, match="writable by group or others"):
        settings({Env.SNAPSHOT_CONTROL_DIR: str(control), Env.CHECKPOINT_HASH: "h"})


def test_modes(control: Path) -> None:
    at_start = settings({"SNAPSHOT_CONTROL_DIR": str(control), Env.CHECKPOINT_HASH: "h"})
    assert at_start is not None and at_start.at_start
    on_request = settings({Env.CONTROL_DIR: str(control), Env.CHECKPOINT_HASH: "h"})
    assert on_request is not None and not on_request.at_start


def test_capture_environment_is_set_where_unset_and_undone() -> None:
    environ = {"NCCL_IB_DISABLE": "0"}
    previous = snapshot.set_capture_env(environ)
    assert environ["NCCL_IB_DISABLE"] == "0"  # the operator's choice stays
    assert environ["NCCL_CUMEM_ENABLE"] == "0" and environ["HF_HUB_OFFLINE"] == "1"
    assert environ["GLOO_SOCKET_IFNAME"] == "lo" and environ["NCCL_SOCKET_IFNAME"] == "lo"
    snapshot.undo_capture_env(environ, previous)
    assert environ == {"NCCL_IB_DISABLE": "0"}


def test_markers_are_read_safely(tmp_path: Path, control: Path) -> None:
    assert read_marker(control, Marker.READY) is None
    outside = tmp_path / "secret"
    outside.write_text("x")
    (control / Marker.RESTORE_COMPLETE).symlink_to(outside)
    with pytest.raises(MarkerError, match="symlink"):
        read_marker(control, Marker.RESTORE_COMPLETE)
    os.mkfifo(control / Marker.SNAPSHOT_COMPLETE)
    with pytest.raises(MarkerError, match="not a regular file"):
        read_marker(control, Marker.SNAPSHOT_COMPLETE)
    (control / Marker.READY).write_bytes(b"x" * (Marker.MAX_BYTES + 1))
    with pytest.raises(MarkerError, match="bytes"):
        read_marker(control, Marker.READY)


def test_markers_someone_else_could_have_written_are_refused(control: Path) -> None:
    marker = control / Marker.RESTORE_COMPLETE
    marker.write_bytes(b"restored")
    marker.chmod(0o600)
    assert read_marker(control, Marker.RESTORE_COMPLETE) == b"restored"
    for mode in (0o620, 0o602, 0o666):
        marker.chmod(mode)
        with pytest.raises(MarkerError, match="writable by other users"):
            read_marker(control, Marker.RESTORE_COMPLETE)
    marker.chmod(0o600)
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(marker, 65534, 65534)
        with pytest.raises(MarkerError, match="belongs to uid 65534"):
            read_marker(control, Marker.RESTORE_COMPLETE)


@pytest.mark.parametrize("content", [b"\xff\xfe", b"[]", b'{"pid": "1", "hash": "h"}',
                                     b'{"pid": 1234, "hash": "../x"}', b'{"pid": true}'])
def test_malformed_ready_markers(content: bytes) -> None:
    with pytest.raises(MarkerError):
        parse_ready(content)


def test_restore_context() -> None:
    allowed = snapshot.ALLOWED_ENV
    changes, warnings = parse_restore_context(json.dumps({"env": {
        "ETCD_ENDPOINTS": "http://10.0.0.1:2379", "DYN_NAMESPACE": None,
        "LD_PRELOAD": "/evil.so"}}).encode(), allowed)
    assert changes == {"ETCD_ENDPOINTS": "http://10.0.0.1:2379", "DYN_NAMESPACE": None}
    assert warnings == [f"{Marker.RESTORE_CONTEXT}: LD_PRELOAD is not allow-listed; ignored"]
    environ = {"DYN_NAMESPACE": "old"}
    snapshot.apply_env_changes(environ, changes)
    assert environ == {"ETCD_ENDPOINTS": "http://10.0.0.1:2379"}
    for bad in (b"{", b"[]", b'{"env": []}', b'{"env": {"ETCD_ENDPOINTS": 5}}'):
        with pytest.raises(MarkerError):
            parse_restore_context(bad, allowed)


def test_the_document_a_checkpointer_writes_parses_back() -> None:
    document = markers.restore_context_document({"B": "2", "A": None})
    assert document == b'{"env":{"A":null,"B":"2"}}'
    assert parse_restore_context(document, frozenset({"A", "B"}))[0] == {"A": None, "B": "2"}


def _run_wait(control: Path, answer: list[tuple[str, bytes]], timeout: float = 5.0
              ) -> snapshot.Answer:
    settings_ = snapshot.SnapshotSettings(control, "h", True, timeout, 0, snapshot.ALLOWED_ENV)

    async def checkpointer() -> None:
        while not (control / Marker.READY).exists():
            await asyncio.sleep(0.02)
        for name, content in answer:
            (control / name).write_bytes(content)

    async def both() -> snapshot.Answer:
        task = asyncio.create_task(checkpointer())
        result = await snapshot.wait_for_checkpointer(settings_, worker=0)
        task.cancel()
        return result

    return asyncio.run(asyncio.wait_for(both(), timeout + 5))


def test_waiting_ends_on_restore_complete_with_the_context(control: Path) -> None:
    result = _run_wait(control, [
        (Marker.RESTORE_CONTEXT, b'{"env": {"DYNAMO_VLLM_INSTANCE": "new"}}'),
        (Marker.RESTORE_COMPLETE, b"restored")])
    assert result.outcome is Outcome.RESTORED
    assert result.env_changes == {"DYNAMO_VLLM_INSTANCE": "new"}
    assert os.listdir(control) == []  # every sentinel removed


def test_a_malformed_context_is_ignored(control: Path) -> None:
    result = _run_wait(control, [(Marker.RESTORE_CONTEXT, b"not json"),
                                 (Marker.RESTORE_COMPLETE, b"")])
    assert result.outcome is Outcome.RESTORED and result.env_changes == {}


def test_waiting_ends_on_snapshot_complete(control: Path) -> None:
    result = _run_wait(control, [(Marker.SNAPSHOT_COMPLETE, b"done")])
    assert result.outcome is Outcome.CHECKPOINTED


def test_no_answer_means_serving_cold(control: Path) -> None:
    result = _run_wait(control, [], timeout=0.5)
    assert result.outcome is Outcome.TIMED_OUT
    assert not (control / Marker.READY).exists()


def test_the_ready_marker_is_written_complete(control: Path) -> None:
    markers.write_marker(control, Marker.READY, b'{"pid": 1234, "hash": "h"}')
    assert parse_ready((control / Marker.READY).read_bytes())["pid"] == 1234
    assert oct((control / Marker.READY).stat().st_mode & 0o777) == "0o600"
    assert not list(control.glob(".*.tmp"))
