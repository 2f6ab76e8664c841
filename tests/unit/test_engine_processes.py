"""Which of the worker's descendants a stop ends (agent/processes.py), with real processes."""

from __future__ import annotations

import subprocess
import sys
from multiprocessing import resource_tracker

import psutil

from dynamo_vllm.agent.processes import descendants, kill_all


def test_the_resource_tracker_is_left_to_exit_by_itself() -> None:
    # The tracker multiprocessing starts for vLLM's shared memory; it ignores SIGTERM.
    resource_tracker.ensure_running()
    tracker = [p for p in psutil.Process().children()
               if "multiprocessing.resource_tracker" in " ".join(p.cmdline())]
    assert tracker, "no resource tracker started"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        found = {p.pid for p in descendants()}
        assert child.pid in found and tracker[0].pid not in found
        # An ordinary leftover ends on SIGTERM: nothing had to be SIGKILLed.
        assert kill_all([p for p in descendants() if p.pid == child.pid]) == []
        assert child.wait(10) is not None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
