from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.system.container import ROOT

BUILD = ROOT / "build" / "system"


@pytest.fixture(scope="session")
def system_builds() -> dict[str, Path]:
    """The .deb (packaging/build-deb), the Debian rootfs and the engine's wheelhouse, built
    at once: one is CPU, the others mostly network, and in turn they took 95 s."""
    steps = {
        "deb": [str(ROOT / "packaging" / "build-deb")],
        "rootfs": [str(ROOT / "tests" / "system" / "build-rootfs"), str(BUILD / "rootfs")],
        "wheelhouse": [str(ROOT / "tests" / "system" / "build-wheelhouse"),
                       str(BUILD / "wheelhouse"), str(Path(sys.executable).with_name("pip"))],
    }
    BUILD.mkdir(parents=True, exist_ok=True)
    running = {name: subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True) for name, args in steps.items()}
    deadline = time.monotonic() + 900
    failed = []
    for name, proc in running.items():
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        if proc.returncode != 0:
            failed.append(f"{name} (exit {proc.returncode}):\n{output[-3000:]}")
    assert not failed, "system-tier builds failed:\n" + "\n".join(failed)
    (deb,) = (ROOT / "dist").glob("dynamo-vllm_*_amd64.deb")
    return {"deb": deb, "rootfs": BUILD / "rootfs", "wheelhouse": BUILD / "wheelhouse"}


@pytest.fixture(scope="session")
def deb(system_builds: dict[str, Path]) -> Path:
    """dist/dynamo-vllm_<version>_amd64.deb, built once per session by packaging/build-deb."""
    return system_builds["deb"]
