from __future__ import annotations

from pathlib import Path

import pytest

from tests.system.container import build_system_images


@pytest.fixture(scope="session")
def system_builds() -> dict[str, Path]:
    """The .deb, the Debian rootfs and the engine's wheelhouse (container.build_system_images)."""
    return build_system_images()


@pytest.fixture(scope="session")
def deb(system_builds: dict[str, Path]) -> Path:
    """dist/dynamo-vllm_<version>_amd64.deb, built once per session by packaging/build-deb."""
    return system_builds["deb"]
