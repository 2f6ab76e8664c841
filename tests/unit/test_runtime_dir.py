"""The runtime directory outside systemd: private, ours, and in a parent no one else owns."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dynamo_vllm.supervisor.runtime_dir import RuntimeDirError, ensure_private_dir


def test_a_private_directory_is_made_and_kept_private(tmp_path: Path) -> None:
    made = ensure_private_dir(tmp_path / "parent" / "tiny")
    assert os.stat(made).st_mode & 0o777 == 0o700
    os.chmod(made, 0o755)
    assert os.stat(ensure_private_dir(made)).st_mode & 0o777 == 0o700


def test_a_parent_someone_else_controls_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    if os.geteuid() == 0:
        os.chown(theirs, 12345, 12345)
        with pytest.raises(RuntimeDirError, match="owned by uid 12345"):
            ensure_private_dir(theirs / "tiny")
        os.chown(theirs, 0, 0)
    os.chmod(theirs, 0o777)
    with pytest.raises(RuntimeDirError, match="writable by group or others"):
        ensure_private_dir(theirs / "tiny")
    os.chmod(theirs, 0o1777)  # a sticky directory, like /tmp: others cannot rename ours
    assert ensure_private_dir(theirs / "tiny").is_dir()


def test_symlinks_are_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.symlink(real, tmp_path / "link")
    with pytest.raises(RuntimeDirError, match="symlinks are refused"):
        ensure_private_dir(tmp_path / "link")
    os.symlink(real, tmp_path / "linked-parent")
    with pytest.raises(RuntimeDirError, match="symlinks are refused"):
        ensure_private_dir(tmp_path / "linked-parent" / "tiny")
