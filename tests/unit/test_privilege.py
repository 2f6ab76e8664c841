"""The privilege split: a root supervisor's workers run as another account with nothing
to gain back (util-linux's setpriv, checked in /proc/PID/status of a real process)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from dynamo_vllm.supervisor.privilege import worker_account
from dynamo_vllm.supervisor.startup import StartupError

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="dropping to another account needs root and setpriv")


def status_of(argv: list[str]) -> dict[str, str]:
    out = subprocess.run([*argv, "cat", "/proc/self/status"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)


@needs_root
def test_the_worker_account_keeps_nothing() -> None:
    account = worker_account("nobody")
    assert account is not None
    uid = pwd.getpwnam("nobody").pw_uid
    fields = status_of(account.command_prefix())
    assert fields["Uid"].split() == [str(uid)] * 4
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[capabilities], 16) == 0, (capabilities, fields[capabilities])
    assert fields["NoNewPrivs"].strip() == "1"


@needs_root
def test_handing_over_refuses_symlinks(tmp_path: Path) -> None:
    account = worker_account("nobody")
    assert account is not None
    os.symlink("/etc", tmp_path / "link")
    with pytest.raises(StartupError, match="symlink"):
        account.hand_over(tmp_path / "link", 0o700)
    (tmp_path / "own").mkdir()
    account.hand_over(tmp_path / "own", 0o700)
    assert (tmp_path / "own").stat().st_uid == account.uid


def test_accounts_that_cannot_be_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYNAMO_VLLM_WORKER_USER", raising=False)
    assert worker_account("") is None  # nothing to drop
    with pytest.raises(StartupError, match="no account 'no-such-user-here'"):
        worker_account("no-such-user-here")
    if os.geteuid() == 0:
        assert worker_account("root") is None  # the supervisor's own: nothing to drop
    monkeypatch.setenv("DYNAMO_VLLM_WORKER_USER", "nobody")
    if os.geteuid() == 0:
        account = worker_account("")
        assert account is not None and account.name == "nobody"
    else:
        with pytest.raises(StartupError, match="needs a supervisor running as root"):
            worker_account("")


def test_checkpoints_of_another_accounts_workers_need_sys_resource() -> None:
    from dynamo_vllm.supervisor.checkpoint.processes import (
        CAP_SYS_RESOURCE,
        has_capability,
        split_problem,
    )

    assert split_problem(False) is None
    held = has_capability(CAP_SYS_RESOURCE)
    assert (split_problem(True) is None) == held
    if not held:  # this machine's root (some sandboxes' root lacks it)
        assert "CAP_SYS_RESOURCE" in (split_problem(True) or "")
