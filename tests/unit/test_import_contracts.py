"""import-linter's contracts (.importlinter, run by `make lint`) fail on a forbidden import:
checked on a scratch copy of the packages, so the real tree is never touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("contract", "agent", "supervisor", "cli", "bench", "tools")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def scratch_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tree / "dynamo_vllm" / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return tree


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    # Wide, so that no contract's name is wrapped in the report.
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "300"}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(ROOT / ".importlinter")],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    result = lint(scratch_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("supervisor/notify.py", "import dynamo_vllm.agent.lifecycle",
     "The supervisor imports the agent only through the contract"),
    ("supervisor/shm.py", "import vllm",
     "The supervisor imports the agent only through the contract"),
    ("agent/status.py", "from dynamo_vllm.supervisor import phases",
     "The agent (the worker) imports nothing of the supervisor"),
    ("contract/gate.py", "import dynamo_vllm.agent.status",
     "The contract imports neither wing"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path: Path, module: str, line: str,
                                              contract: str) -> None:
    tree = scratch_tree(tmp_path)
    path = tree / "dynamo_vllm" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    result = lint(tree)
    assert result.returncode != 0
    broken = [text for text in result.stdout.splitlines() if text.endswith(" BROKEN")]
    assert any(text.startswith(contract) for text in broken), result.stdout
