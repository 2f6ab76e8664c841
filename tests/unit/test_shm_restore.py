"""Before a restore, saved /dev/shm files go back; a file someone else made under a saved
name refuses the restore instead of being mapped (a real filesystem, a stand-in for
/dev/shm)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dynamo_vllm.supervisor.checkpoint.criu import CheckpointError, put_back_shm


def saved_queues(tmp_path: Path) -> tuple[Path, Path]:
    saved, shm = tmp_path / "saved", tmp_path / "shm"
    saved.mkdir()
    shm.mkdir()
    for name in ("psm_a1", "psm_b2"):
        (saved / name).write_bytes(b"queue")
        (saved / name).chmod(0o600)
    return saved, shm


def test_missing_queues_go_back_and_ours_stay(tmp_path: Path) -> None:
    saved, shm = saved_queues(tmp_path)
    (shm / "psm_b2").write_bytes(b"ours, still there")
    put = put_back_shm(saved, shm)
    assert put == [shm / "psm_a1"] and (shm / "psm_a1").read_bytes() == b"queue"
    assert (shm / "psm_b2").read_bytes() == b"ours, still there"


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file of another user needs root")
def test_a_squatted_name_refuses_the_restore(tmp_path: Path) -> None:
    saved, shm = saved_queues(tmp_path)
    squatted = shm / "psm_b2"
    squatted.write_bytes(b"\x80\x04evil pickle")
    os.chown(squatted, 12345, 12345)
    with pytest.raises(CheckpointError, match="not the service's"):
        put_back_shm(saved, shm)
    assert not (shm / "psm_a1").exists(), "what was put back is removed again"
    assert squatted.read_bytes() == b"\x80\x04evil pickle"


def test_a_symlink_under_a_saved_name_refuses_the_restore(tmp_path: Path) -> None:
    saved, shm = saved_queues(tmp_path)
    os.symlink(tmp_path / "elsewhere", shm / "psm_a1")
    with pytest.raises(CheckpointError, match="not the service's"):
        put_back_shm(saved, shm)
