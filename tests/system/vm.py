"""Boot the test VM (QEMU with TCG: this machine's /dev/kvm cannot run a stock kernel).

The guest runs `<share>/run.sh` once booted and writes its exit status to `<share>/rc`;
`hostfwd` forwards host loopback ports to the guest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


class VMError(AssertionError):
    pass


class VM:
    def __init__(self, image_dir: Path, share: Path, forwards: dict[int, int] | None = None,
                 memory_mb: int = 4096):
        self.image_dir = image_dir.resolve()
        self.share = share.resolve()
        self.forwards = forwards or {}
        self.memory_mb = memory_mb
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> VM:
        # Beside the share, not in it: the guest sees the share.
        overlay = self.share.with_name(self.share.name + "-overlay.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        str(self.image_dir / "rootfs.img"), str(overlay)], check=True,
                       timeout=60)
        netdev = "user,id=n0" + "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}"
                                        for host, guest in self.forwards.items())
        args = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-M", "pc",
                "-smp", "2", "-m", str(self.memory_mb), "-nodefaults", "-no-reboot",
                "-display", "none", "-vga", "none",
                "-serial", f"file:{self.share / 'serial.log'}",
                "-kernel", str(self.image_dir / "vmlinux"),
                "-initrd", str(self.image_dir / "initrd.img"),
                "-append", "console=ttyS0 root=/dev/vda quiet systemd.show_status=0 "
                           "loglevel=4 panic=-1",
                "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
                "-virtfs", f"local,path={self.share},mount_tag=share,security_model=none,"
                           "id=share",
                "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0",
                "-device", "virtio-rng-pci"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.share / "qemu.log", "wb"),  # noqa: SIM115
                                     start_new_session=True)
        return self

    def wait_rc(self, timeout: float) -> int:
        """Wait for the guest script's exit status (99: the guest never got that far)."""
        assert self.proc is not None
        rc_path = self.share / "rc"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if rc_path.exists():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(60)
                return int(rc_path.read_text().strip() or 99)
            if self.proc.poll() is not None:
                return 99
            time.sleep(0.5)
        return 99

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
