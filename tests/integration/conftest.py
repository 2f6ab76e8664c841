from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


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
