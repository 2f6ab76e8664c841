from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CRIU = ROOT / ".criu" / "bin" / "criu"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama and a LoRA adapter for it, built by the project's own command."""
    out = tmp_path_factory.mktemp("models")
    subprocess.run([sys.executable, "-m", "dynamo_vllm.supervisor.cli", "tiny-model",
                    str(out / "tiny"), "--lora", str(out / "loras" / "tiny-lora")],
                   check=True, timeout=120, capture_output=True)
    return out


@pytest.fixture(scope="session")
def tiny_model(model_dir: Path) -> Path:
    return model_dir / "tiny"


@pytest.fixture(scope="session")
def tiny_lora(model_dir: Path) -> Path:
    """A PEFT adapter for the tiny model, under `<models>/loras` (an allowed root)."""
    return model_dir / "loras" / "tiny-lora"


@pytest.fixture(scope="session")
def criu() -> Path:
    """CRIU 4.2 as `make setup` installs it (scripts/install-criu), checked on this kernel."""
    if not os.access(CRIU, os.X_OK):
        pytest.fail(f"{CRIU} is missing: `make setup` installs it (scripts/install-criu)")
    out = subprocess.run([str(CRIU), "check"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"criu check failed here: {out.stdout}{out.stderr}"
    return CRIU
