"""A Debian 12 container booted with systemd (`systemd-nspawn --boot`), driven from the host.

The container shares the host's network namespace (so the host scrapes the agent on
loopback), runs on a throwaway overlay of the rootfs, and is entered with `nsenter` to run
commands: systemctl, journalctl and dpkg talk to the container's own systemd.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
GUEST_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}


class GuestError(AssertionError):
    pass


def missing_tools() -> list[str]:
    return [tool for tool in ("systemd-nspawn", "mmdebstrap", "nsenter", "dpkg-buildpackage")
            if shutil.which(tool) is None]


class Container:
    def __init__(self, rootfs: Path, share: Path, log_path: Path,
                 binds: dict[Path, str] | None = None):
        self.rootfs = rootfs
        self.share = share
        self.log_path = log_path
        self.binds = binds or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None

    def boot(self, timeout: float = 120) -> Container:
        args = ["systemd-nspawn", "-D", str(self.rootfs), "--volatile=overlay", "--boot",
                "--register=no", "--keep-unit", "--console=pipe",
                f"--bind={self.share}:/mnt/share"]
        args += [f"--bind-ro={host}:{guest}" for host, guest in self.binds.items()]
        args += ["--", "systemd.mask=systemd-networkd.service",
                 "systemd.mask=systemd-udevd.service"]
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while self.leader is None:
            if self.proc.poll() is not None:
                raise GuestError(f"systemd-nspawn exited {self.proc.returncode}:\n"
                                 + self.log_path.read_text(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                raise GuestError("the container's init did not appear")
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(self.proc.pid).children():
                    if child.name() == "systemd":
                        self.leader = child.pid
            time.sleep(0.1)
        state = self.run("systemctl is-system-running --wait", timeout=timeout, check=False)
        if state.stdout.strip() not in ("running", "degraded"):
            raise GuestError(f"the container did not boot: {state.stdout} {state.stderr}\n"
                             + self.run("systemctl --failed", check=False).stdout)
        return self

    def run(self, command: str, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `command` with /bin/sh inside the container."""
        assert self.leader is not None, "not booted"
        args = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-p", "-C", "--",
                "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in GUEST_ENV.items()),
                "/bin/sh", "-c", command]
        try:
            result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise GuestError(f"timed out after {timeout:g} s: {command}") from exc
        if check and result.returncode != 0:
            raise GuestError(f"`{command}` exited {result.returncode}:\n{result.stdout}\n"
                             f"{result.stderr}")
        return result

    def show(self, unit: str, prop: str) -> str:
        return self.run(f"systemctl show -P {prop} {unit}").stdout.strip()

    def wait(self, predicate_cmd: str, timeout: float, what: str, interval: float = 0.5) -> str:
        """Wait until `predicate_cmd` exits 0 in the container; returns its output."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.run(predicate_cmd, check=False)
            if last.returncode == 0:
                return last.stdout
            time.sleep(interval)
        detail = f"{last.stdout}\n{last.stderr}" if last else ""
        raise GuestError(f"timed out after {timeout:g} s waiting for {what}: {detail}")

    def shutdown(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(GuestError, OSError):
            self.run("systemctl poweroff --no-block", timeout=10, check=False)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
