"""The short soak (CI): every fault once, in an order drawn from a fixed seed, on a real
supervisor with two real engines under streaming load through Dynamo's frontend, its child
(the frontend's own faults included; the direct load is `make soak`'s default, and had its
long runs: docs/reliability.md). The long one: `make soak`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.soak.harness import SoakSettings, run_soak

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(os.geteuid() != 0, reason="the store's tmpfs and CRIU need root"),
    pytest.mark.timeout(1200),
]


EXPECTED_REASONS = {"kill_engine_core": "engine_dead", "kill_worker": "killed",
                    "stop_worker": "worker_hung", "stop_engine_core": "engine_hung"}


def test_every_fault_once_loses_no_request(tiny_model: Path, criu: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("SOAK_SEED", "7"))
    report, soak = run_soak(tiny_model, criu, tmp_path, SoakSettings(seed=seed, frontend=True))
    print(f"\nsoak through the frontend, seed {seed}:\n{report}")
    assert not soak.violations, report
    run = {r.fault for r in soak.results}
    assert run | set(soak.skipped) == set(soak.settings.faults), report
    assert {"kill_frontend", "stop_frontend"} <= run, report
    # The supervisor says why each life ended (the restart reason label).
    for result in soak.results:
        if result.fault in EXPECTED_REASONS:
            assert result.reasons == EXPECTED_REASONS[result.fault], (result, report)
