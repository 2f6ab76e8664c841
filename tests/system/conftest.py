from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.system.container import ROOT


@pytest.fixture(scope="session")
def deb() -> Path:
    """dist/dynamo-vllm_<version>_amd64.deb, built once per session by packaging/build-deb."""
    result = subprocess.run([str(ROOT / "packaging" / "build-deb")], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"build-deb failed:\n{result.stdout}\n{result.stderr}"
    (path,) = (ROOT / "dist").glob("dynamo-vllm_*_amd64.deb")
    return path
