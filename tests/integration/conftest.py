from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama, built by the project's own command (no downloads)."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    subprocess.run([sys.executable, "-m", "dynamo_vllm.supervisor.cli", "tiny-model", str(out)],
                   check=True, timeout=120, capture_output=True)
    return out
