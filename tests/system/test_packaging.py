"""The wheel and the .deb are complete and clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.system.container import ROOT

pytestmark = pytest.mark.timeout(900)


def test_the_wheel_carries_every_module(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                             "--outdir", str(tmp_path), str(ROOT)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("dynamo_vllm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("agent", "supervisor"):
        for source in (ROOT / folder).rglob("*.py"):
            packaged = f"dynamo_vllm/{folder}/{source.relative_to(ROOT / folder).as_posix()}"
            assert packaged in names, f"{packaged} missing from {wheel.name}"
    assert "dynamo_vllm/tools/cpu-constraints.txt" in names
    assert any(n.endswith("entry_points.txt") for n in names)


@pytest.mark.skipif(shutil.which("lintian") is None, reason="lintian not installed")
def test_the_deb_is_lintian_clean(deb: Path) -> None:
    result = subprocess.run(["lintian", "--pedantic", str(deb)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_deb_holds_units_users_and_a_conffile(deb: Path) -> None:
    contents = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                              check=True, timeout=60).stdout
    for path in ("./lib/systemd/system/dynamo-vllm@.service",
                 "./lib/systemd/system/dynamo-vllm.target",
                 "./usr/lib/sysusers.d/dynamo-vllm.conf", "./usr/lib/tmpfiles.d/dynamo-vllm.conf",
                 "./opt/dynamo-vllm/venv/bin/dynamo-vllm", "./usr/bin/dynamo-vllm",
                 "./usr/share/doc/dynamo-vllm/README.md"):
        assert path in contents, path
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                             text=True, check=True, timeout=60).stdout
    assert "python3.11" in depends
    control = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True,
                             text=True, check=True, timeout=60).stdout
    assert control.split() == ["/etc/dynamo-vllm/example.toml"]
