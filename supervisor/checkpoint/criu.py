"""Checkpointers: what dumps a worker's process tree and restores it. One interface, so the
flow around it is the same whatever does the dump; `CriuCheckpointer` is the real one.

CRIU needs root (or CAP_CHECKPOINT_RESTORE with CAP_SYS_PTRACE). `check()` runs `criu check`
under a timeout at start, so a host where CRIU cannot work says "unavailable: reason" and
never hangs. On GPUs, CRIU's CUDA plugin (from `checkpoint.criu_libdir`, or CRIU's default
plugin directory) drives cuda-checkpoint before the memory dump.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dynamo_vllm.supervisor.shm import SHM, shm_files, tree_pids

# Deleted files still open (multiprocessing's semaphores in /dev/shm) are kept in the image
# up to this size each.
GHOST_LIMIT = "512M"
CHECK_TIMEOUT_S = 30.0
# Beside the images: the /dev/shm files the tree used (see save_shm).
SHM_DIR = "shm"


class CheckpointError(Exception):
    """A dump or a restore failed; the message says why (CRIU's own error lines)."""


@dataclass
class DumpResult:
    seconds: float
    pids: list[int] = field(default_factory=list)
    """The processes dumped (ended by the dump unless it left them running)."""
    stdio: dict[str, str] = field(default_factory=dict)
    """What the root's stdin/stdout/stderr were (`pipe:[N]`, `socket:[N]`, a path): a restore
    hands the supervisor's own in their place."""


class Checkpointer(Protocol):
    name: str

    def check(self) -> str | None:
        """None when dumps can work here, else why not."""

    async def dump(self, pid: int, images: Path, leave_running: bool) -> DumpResult:
        """Dump the process tree rooted at `pid` into `images`."""

    async def restore(self, images: Path, work_dir: Path, stdio: dict[str, str]) -> int:
        """Restore the tree from `images`, detached; returns the root's pid."""


def seccomp_mode(status: Path = Path("/proc/self/status")) -> int:
    """This process's seccomp mode: 0 none, 1 strict, 2 a filter (systemd's sandboxing)."""
    with contextlib.suppress(OSError, ValueError):
        for line in status.read_text().splitlines():
            if line.startswith("Seccomp:"):
                return int(line.split(":", 1)[1])
    return 0


def stdio_of(pid: int) -> dict[str, str]:
    links = {}
    for fd in ("0", "1", "2"):
        with contextlib.suppress(OSError):
            links[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return links


def save_shm(names: set[str], before: set[str], dest: Path) -> None:
    """Copy the tree's /dev/shm files, and the link-remap files the dump left there (which
    a restore consumes), into `dest`; the latter are then removed from /dev/shm."""
    dest.mkdir(mode=0o700, exist_ok=True)
    remaps = {str(SHM / n) for n in _listdir(SHM) if n.startswith("link_remap.")} - before
    for path in sorted(names | remaps):
        source = Path(path)
        if source.parent != SHM or source.is_symlink() or not source.is_file():
            continue
        _copy_sparse(source, dest / source.name)
    for path in remaps:
        with contextlib.suppress(OSError):
            os.unlink(path)


def put_back_shm(saved: Path, shm: Path = SHM) -> list[Path]:
    """Before a restore: the saved /dev/shm files that are missing go back, modes kept.
    Returns those put back (a failed restore removes them again).

    /dev/shm is shared with every local user: one who made a file under a saved name
    while the worker was down would have the restored tree map it, and vLLM's queue unpickle
    what they write. An entry of that name that is not a regular file of the saved file's
    owner refuses the restore (CheckpointError: a cold start, with the reason)."""
    put: list[Path] = []
    for name in _listdir(saved):
        target, source = shm / name, saved / name
        if "/" in name or source.is_symlink():
            continue
        if os.path.lexists(target):
            info, owner = os.lstat(target), os.lstat(source).st_uid
            if not stat.S_ISREG(info.st_mode) or info.st_uid != owner:
                for path in put:
                    with contextlib.suppress(OSError):
                        path.unlink()
                raise CheckpointError(f"{target} exists and is not the service's (uid "
                                      f"{info.st_uid}, mode {info.st_mode:o}): not restoring "
                                      "into a file someone else made")
            continue
        _copy_sparse(source, target)
        put.append(target)
    return put


def _copy_sparse(source: Path, target: Path) -> None:
    """vLLM's queues are large and mostly holes: keep them holes (and keep mode and owner,
    which CRIU checks)."""
    import subprocess

    out = subprocess.run(["cp", "--sparse=always", "--preserve=mode,ownership", "--no-dereference",
                          str(source), str(target)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise OSError(f"copying {source} to {target} failed: {out.stderr.strip()}")


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def error_lines(log_text: str, limit: int = 3) -> str:
    """CRIU's own error lines, without the ones it prints for every run on some hosts."""
    lines = [line.strip() for line in log_text.splitlines()
             if "Error (" in line and "RLIMIT_NOFILE" not in line]
    if not lines:
        tail = [line.strip() for line in log_text.splitlines() if line.strip()][-limit:]
        return " | ".join(tail) or "no error in CRIU's log"
    cleaned = [re.sub(r"^\(\d+\.\d+\)\s*", "", line) for line in lines[:limit]]
    return " | ".join(cleaned)


class CriuCheckpointer:
    name = "criu"

    def __init__(self, binary: str = "criu", libdir: str = "", timeout: float = 600.0):
        self.binary = binary
        self.libdir = libdir
        self.timeout = timeout
        # One dump or restore at a time: the link-remap files in /dev/shm are told apart
        # only by what appeared during a dump, and two images may use the same names.
        self._one_at_a_time = asyncio.Lock()

    def _common(self) -> list[str]:
        args = ["-v4", "--tcp-close", "--ext-unix-sk", "--link-remap",
                "--ghost-limit", GHOST_LIMIT]
        if self.libdir:
            args += ["-L", self.libdir]
        return args

    def dump_command(self, pid: int, images: Path, leave_running: bool,
                     stdio: dict[str, str] | None = None) -> list[str]:
        """`stdio`: the tree's fd 0-2 links (stdio_of), which decide --shell-job and the
        external sockets, as they decide the restore's --inherit-fd."""
        stdio = stdio or {}
        # --skip-in-flight: a client that connected while the tree was frozen (a health
        # poll, a load balancer's probe) sits unaccepted in the listen queue; CRIU refuses
        # to dump such a socket, and that client is better reset than the checkpoint lost.
        cmd = [self.binary, "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log",
               *self._common(), "--skip-in-flight"]
        if leave_running:
            cmd.append("--leave-running")
        if any(link.startswith(("/dev/pts/", "/dev/tty")) for link in stdio.values()):
            cmd.append("--shell-job")
        # Under systemd the tree's stdout and stderr are a stream socket to journald, whose
        # other half CRIU cannot dump; marked external, the restore hands it the current
        # one (restore_command's --inherit-fd).
        for ino in sorted({link[len("socket:["):-1] for link in stdio.values()
                           if link.startswith("socket:[") and link.endswith("]")}):
            cmd += ["--external", f"unix[{ino}]"]
        return cmd

    def restore_command(self, images: Path, work_dir: Path, stdio: dict[str, str]) -> list[str]:
        log_name = f"restore-{int(time.time())}.log"
        cmd = [self.binary, "restore", "-D", str(images), "-W", str(work_dir), "-o", log_name,
               "-d", "--pidfile", str(work_dir / "restored.pid"), *self._common()]
        # The dumped tree's stdout/stderr were the supervisor's then (a pipe, or journald's
        # socket); hand it the supervisor's of now, which criu inherits as its own fds.
        # A log file counts too: CRIU would refuse it for having grown since the dump.
        seen = set()
        for fd in ("1", "2"):
            link = stdio.get(fd, "")
            if link in seen:
                continue
            seen.add(link)
            if link.startswith(("pipe:", "socket:")):
                cmd += ["--inherit-fd", f"fd[{fd}]:{link}"]
            elif link.startswith("/") and not link.startswith("/dev/"):
                cmd += ["--inherit-fd", f"fd[{fd}]:{link.lstrip('/')}"]
        if any(link.startswith("/dev/pts/") or link.startswith("/dev/tty")
               for link in stdio.values()):
            cmd.append("--shell-job")
        return cmd

    def check(self) -> str | None:
        import subprocess

        filtered = seccomp_mode()
        if filtered:
            # `criu check` passes under a filter, and every dump then fails: a tracer under
            # seccomp may not suspend its tracee's filter, which the workers inherit.
            return (f"this process runs under a seccomp filter (Seccomp: {filtered}), so CRIU "
                    "could not dump its workers; under systemd, install the checkpoint "
                    "drop-in, which turns off the unit's system call filters "
                    "(systemd/checkpoint.conf.example)")
        try:
            out = subprocess.run([self.binary, "check"], capture_output=True, text=True,
                                 timeout=CHECK_TIMEOUT_S, check=False)
        except FileNotFoundError:
            return f"{self.binary} not found (checkpoint.criu; install CRIU 4.2 or newer)"
        except PermissionError:
            return f"{self.binary} is not executable"
        except subprocess.TimeoutExpired:
            return f"`{self.binary} check` did not finish within {CHECK_TIMEOUT_S:g} s"
        if out.returncode == 0:
            return None
        text = out.stdout + out.stderr
        if os.geteuid() != 0 and "Operation not permitted" in text:
            return ("CRIU needs root (or CAP_CHECKPOINT_RESTORE and CAP_SYS_PTRACE): "
                    + error_lines(text))
        return f"`{self.binary} check` failed: {error_lines(text)}"

    async def _run(self, cmd: list[str], log_path: Path, what: str, capture: bool = True) -> None:
        """Run criu; its log file says why it failed. A restore must not capture: the
        restored tree inherits criu's stdout and stderr (--inherit-fd), and must get the
        supervisor's, not a pipe to us."""
        pipe = asyncio.subprocess.PIPE if capture else None
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=pipe,
            stderr=asyncio.subprocess.STDOUT if capture else None)
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise CheckpointError(f"{what} did not finish within {self.timeout:g} s "
                                  "(checkpoint.timeout)") from None
        if proc.returncode != 0:
            try:
                text = log_path.read_text(errors="replace")
            except OSError:
                text = (output or b"").decode(errors="replace")
            raise CheckpointError(f"{what} failed (criu exit {proc.returncode}): "
                                  f"{error_lines(text)}")

    async def dump(self, pid: int, images: Path, leave_running: bool) -> DumpResult:
        stdio = stdio_of(pid)
        pids = tree_pids(pid)
        started = time.monotonic()
        async with self._one_at_a_time:
            shm, before = shm_files(pids), {str(SHM / n) for n in _listdir(SHM)}
            await self._run(self.dump_command(pid, images, leave_running, stdio),
                            images / "dump.log", "criu dump")
            # After a dump that ends the tree, the link-remap files CRIU left in /dev/shm
            # are what a restore needs (one that leaves it running removes them).
            save_shm(shm, before, images.parent / SHM_DIR)
        return DumpResult(time.monotonic() - started, pids, stdio)

    async def restore(self, images: Path, work_dir: Path, stdio: dict[str, str]) -> int:
        work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pidfile = work_dir / "restored.pid"
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
        cmd = self.restore_command(images, work_dir, stdio)
        async with self._one_at_a_time:
            put = put_back_shm(images.parent / SHM_DIR)
            try:
                await self._run(cmd, work_dir / cmd[cmd.index("-o") + 1], "criu restore",
                                capture=False)
            except CheckpointError:
                for path in put:  # nobody uses them: the restored tree is gone
                    with contextlib.suppress(OSError):
                        path.unlink()
                raise
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"criu restore gave no pid: {exc}") from None
