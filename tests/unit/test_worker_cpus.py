"""A CPU-engine worker keeps to the CPUs the supervisor gave it, before torch is imported.

Run in a fresh interpreter each time: the affinity is the process's own.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("import os, sys; from dynamo_vllm.agent.__main__ import _keep_to_own_cpus; "
         "_keep_to_own_cpus(); print(sorted(os.sched_getaffinity(0))); "
         "print('torch' in sys.modules)")


def _affinity_after(value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DYNAMO_VLLM_WORKER_CPUS"}
    if value is not None:
        env["DYNAMO_VLLM_WORKER_CPUS"] = value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=60, check=True)


def test_the_worker_moves_to_its_own_cpus_before_torch() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    own = allowed[-1:]
    done = _affinity_after(",".join(str(c) for c in own))
    assert done.stdout.split("\n")[:2] == [str(own), "False"], done


def test_without_the_variable_the_affinity_is_left_alone() -> None:
    done = _affinity_after(None)
    assert done.stdout.split("\n")[0] == str(sorted(os.sched_getaffinity(0)))
    assert done.stderr == ""


@pytest.mark.parametrize("value", ["one,two", "0-3"])
def test_a_bad_value_is_reported_and_ignored(value: str) -> None:
    done = _affinity_after(value)
    assert done.stdout.split("\n")[0] == str(sorted(os.sched_getaffinity(0)))
    assert f"ignoring DYNAMO_VLLM_WORKER_CPUS={value!r}" in done.stderr
