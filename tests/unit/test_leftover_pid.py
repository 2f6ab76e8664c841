"""A ready marker's pid is trusted for a kill or a dump only when the process is one of this
instance's workers: ours, leading its group, started for that control directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dynamo_vllm.contract.protocol import Env
from dynamo_vllm.supervisor.checkpoint.processes import not_our_worker

SLEEP = [sys.executable, "-c", "import time; time.sleep(30)"]


def test_only_a_worker_started_for_the_directory_passes(tmp_path: Path) -> None:
    control = tmp_path / "control" / "0"
    ours = subprocess.Popen(SLEEP, env={**os.environ, Env.CONTROL_DIR: str(control)},
                            start_new_session=True)
    other_dir = subprocess.Popen(SLEEP, env={**os.environ, Env.CONTROL_DIR: str(tmp_path)},
                                 start_new_session=True)
    not_leader = subprocess.Popen(SLEEP, env={**os.environ, Env.CONTROL_DIR: str(control)})
    try:
        assert not_our_worker(ours.pid, control, os.geteuid()) is None
        assert "runs as uid" in (not_our_worker(ours.pid, control, 12345) or "")
        assert "was not started for" in (not_our_worker(other_dir.pid, control, os.geteuid()) or "")
        assert "does not lead its process group" in (not_our_worker(not_leader.pid, control,
                                                                    os.geteuid())
                                                     or "")
        assert "cannot be inspected" in (not_our_worker(2**22 + 7, control, os.geteuid()) or "")
    finally:
        for proc in (ours, other_dir, not_leader):
            proc.kill()
            proc.wait(10)
