"""The .deb and the unit in a real VM: Debian 12's own kernel and systemd under QEMU (TCG).

The guest script (vm_guest/run.sh) installs the .deb, starts an instance with fake workers
and checks the unit's semantics: READY before `start` returns, STATUS=, a worker killed and
replaced, reload, the watchdog restarting a stopped supervisor, a bad config failing once
with exit 78, stop, remove and purge. The host scrapes /metrics through a forwarded port.
A real engine runs in the nspawn tier: under TCG its start alone takes 2-3 minutes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.harness import free_port
from tests.system.container import BUILD
from tests.system.vm import VM

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="building the VM image needs root"),
    pytest.mark.timeout(1200),
]

GUEST = Path(__file__).with_name("vm_guest")


def test_the_unit_in_a_booted_vm(deb: Path, tmp_path: Path) -> None:
    missing = [t for t in ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "busybox")
               if shutil.which(t) is None]
    assert not missing, f"missing tools (scripts/install-system-deps): {missing}"
    for args in ([str(GUEST.parent / "build-rootfs"), str(BUILD / "rootfs")],
                 [str(GUEST.parent / "build-vm-image"), str(BUILD / "rootfs"),
                  str(BUILD / "vm")]):
        built = subprocess.run(args, capture_output=True, text=True, timeout=600)
        assert built.returncode == 0, f"{args[0]}:\n{built.stdout}\n{built.stderr}"
    share = tmp_path / "share"
    share.mkdir()
    shutil.copy(deb, share / "dynamo-vllm.deb")
    for name in ("run.sh", "fake_worker.py"):
        shutil.copy(GUEST / name, share / name)
    host_port = free_port()
    started = time.monotonic()
    vm = VM(BUILD / "vm", share, forwards={host_port: 9400}).start()
    try:
        deadline = time.monotonic() + 600
        while not (share / "guest-ready").exists() and time.monotonic() < deadline:
            if (share / "rc").exists() or (vm.proc and vm.proc.poll() is not None):
                break
            time.sleep(0.5)
        scraped = ""
        if (share / "guest-ready").exists():
            try:
                scraped = httpx.get(f"http://127.0.0.1:{host_port}/metrics", timeout=30).text
            except httpx.HTTPError as exc:
                scraped = f"scrape failed: {exc}"
        (share / "host-done").write_text(scraped or "no scrape")
        rc = vm.wait_rc(600)
    finally:
        vm.stop()
    log = (share / "result.log").read_text() if (share / "result.log").exists() else ""
    serial = (share / "serial.log").read_text(errors="replace")[-3000:]
    print(f"VM run: {time.monotonic() - started:.0f} s\n{log}")
    assert rc == 0, f"guest rc {rc}\n{log}\n--- serial ---\n{serial}"
    assert "dynamo_agent_workers_serving 2.0" in scraped
    assert log.strip().splitlines()[-1].endswith("0 failed")
