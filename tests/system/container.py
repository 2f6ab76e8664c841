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
import sys
import textwrap
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "system"
GUEST_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}


# What CRIU needs from the container on top of nspawn's defaults, for checkpoints under the
# unit with its drop-in (systemd/checkpoint.conf.example): every capability
# (CAP_CHECKPOINT_RESTORE and CAP_NET_ADMIN are not in nspawn's set), /proc/sys writable
# (CRIU sets ns_last_pid), and no seccomp filter on the container, since a tracer under one
# may not suspend its tracee's ("suspending seccomp failed"). The unit's own sandbox inside
# is what its drop-ins say, as on a host. CRIU itself is bound at its host path.
CRIU_DIR = ROOT / ".criu"
CRIU_NSPAWN_ARGS = ["--capability=all"]
CRIU_NSPAWN_ENV = {"SYSTEMD_NSPAWN_API_VFS_WRITABLE": "1", "SYSTEMD_SECCOMP": "0"}


# The tiny model, built inside the guest (`dynamo-vllm tiny-model`), and its instance.
GUEST_MODEL = "/var/lib/dynamo-vllm/models/tiny"


def tiny_instance_config(base_port: int, metrics_port: int, workers: int = 1,
                         **extra: str) -> str:
    """/etc/dynamo-vllm/tiny.toml: `workers` on the CPU engine; `extra` TOML sections
    (name to body) are appended."""
    text = textwrap.dedent(f"""
        [model]
        path = "{GUEST_MODEL}"
        served_name = "tiny"
        [workers]
        count = {workers}
        base_port = {base_port}
        drain_timeout = 5.0
        stop_timeout = 30.0
        [metrics]
        port = {metrics_port}
        [engine]
        enforce_eager = true
        max_model_len = 512
        kv_cache_memory_bytes = 67108864
        dtype = "float32"
        max_num_seqs = 8
        """)
    return text + "".join(f"[{name}]\n{body}\n" for name, body in extra.items())


class GuestError(AssertionError):
    pass


def build_system_images(timeout: float = 900) -> dict[str, Path]:
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
    deadline = time.monotonic() + timeout
    failed = []
    for name, proc in running.items():
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        if proc.returncode != 0:
            failed.append(f"{name} (exit {proc.returncode}):\n{output[-3000:]}")
    if failed:
        raise GuestError("system-tier builds failed:\n" + "\n".join(failed))
    (deb,) = (ROOT / "dist").glob("dynamo-vllm_*_amd64.deb")
    return {"deb": deb, "rootfs": BUILD / "rootfs", "wheelhouse": BUILD / "wheelhouse"}


def missing_tools() -> list[str]:
    return [tool for tool in ("systemd-nspawn", "mmdebstrap", "nsenter", "dpkg-buildpackage")
            if shutil.which(tool) is None]


class Container:
    def __init__(self, rootfs: Path, share: Path, log_path: Path,
                 binds: dict[Path, str] | None = None, for_criu: bool = False):
        self.rootfs = rootfs
        self.share = share
        self.log_path = log_path
        self.binds = binds or {}
        self.for_criu = for_criu
        if for_criu:
            self.binds[CRIU_DIR] = str(CRIU_DIR)
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None

    def boot(self, timeout: float = 120) -> Container:
        args = ["systemd-nspawn", "-D", str(self.rootfs), "--volatile=overlay", "--boot",
                "--register=no", "--keep-unit", "--console=pipe",
                f"--bind={self.share}:/mnt/share"]
        args += [f"--bind-ro={host}:{guest}" for host, guest in self.binds.items()]
        if self.for_criu:
            args += CRIU_NSPAWN_ARGS
        args += ["--", "systemd.mask=systemd-networkd.service",
                 "systemd.mask=systemd-udevd.service"]
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child holds it
        env = {**os.environ, **(CRIU_NSPAWN_ENV if self.for_criu else {})}
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True, env=env)
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
