"""Where the engine lives: the layered venv that `dynamo-vllm engine install` writes and
whose interpreter the supervisor spawns workers with (reference/packaging.md §6 C)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENGINE_DIR_NAME = "engine"
MARKER = "dynamo-vllm-engine.json"
PTH_NAME = "dynamo-vllm-agent.pth"


def default_engine_dir() -> Path:
    """`<prefix>/../engine`: /opt/dynamo-vllm/engine beside /opt/dynamo-vllm/venv."""
    return Path(sys.prefix).parent / ENGINE_DIR_NAME


def engine_python(engine_dir: Path | None = None) -> str | None:
    """The engine venv's interpreter, if an engine is installed there."""
    directory = engine_dir or default_engine_dir()
    python = directory / "bin" / "python"
    if (directory / MARKER).is_file() and os.access(python, os.X_OK):
        return str(python)
    return None
