"""Test-wide settings (nothing a test starts talks to anything but this machine) and the
fixtures engine tests share: the tiny model and CRIU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Set before anything imports vLLM; every subprocess inherits them.
for _name, _value in {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
}.items():
    os.environ[_name] = _value
os.environ.pop("NOTIFY_SOCKET", None)
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

ROOT = Path(__file__).resolve().parents[1]
CRIU = ROOT / ".criu" / "bin" / "criu"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama and a LoRA adapter for it, built by the project's own command."""
    out = tmp_path_factory.mktemp("models")
    subprocess.run([sys.executable, "-m", "dynamo_vllm.cli.main", "tiny-model",
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
