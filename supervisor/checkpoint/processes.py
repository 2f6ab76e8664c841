"""The process side of checkpoints: where the store lives, becoming the subreaper that
restored trees are re-parented to, and waiting for dumped processes to be gone."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import time
from pathlib import Path

from dynamo_vllm.contract.config import Config
from dynamo_vllm.contract.protocol import Env

PR_SET_CHILD_SUBREAPER = 36
CAP_SYS_RESOURCE = 24
# Free space below which a failed dump is put down to a full store.
FULL_BELOW = 16 * 2**20


def store_root(config: Config, runtime_dir: Path, instance: str) -> Path:
    """checkpoint.store, else `$STATE_DIRECTORY/checkpoints/<instance>` under systemd (the
    state directory is shared by the instances), else beside the runtime files."""
    if config.checkpoint.store:
        return Path(config.checkpoint.store)
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(state) / "checkpoints" / instance if state else runtime_dir / "checkpoints"


def free_bytes(path: Path) -> int:
    try:
        info = os.statvfs(path)
    except OSError:
        return FULL_BELOW
    return info.f_bavail * info.f_frsize


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def reap(pids: list[int], timeout: float = 10.0) -> None:
    """Wait until the dumped processes are gone, so that a restore finds their pids free.
    The engine processes are ours to reap (re-parented to the subreaper); the worker
    itself is reaped by asyncio, which spawned it."""
    deadline = time.monotonic() + timeout
    root, pending = pids[0], set(pids)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            if pid == root:
                done = not alive(pid)
            else:
                try:
                    done = os.waitpid(pid, os.WNOHANG)[0] == pid
                except ChildProcessError:
                    done = not alive(pid)
            if done:
                pending.discard(pid)
        if pending:
            await asyncio.sleep(0.05)


def not_our_worker(pid: int, control_dir: Path, uid: int) -> str | None:
    """Why `pid` (read from a ready marker) is not a worker of this instance waiting in
    `control_dir`, or None. A marker's pid is never trusted alone for a kill or a dump: the
    process must run as the workers' account `uid`, lead its own process group (the group
    is what is killed) and have been started for this very control directory."""
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
        with open(f"/proc/{pid}/environ", "rb") as fh:
            environ = fh.read(1 << 20).split(b"\0")
    except OSError as exc:
        return f"pid {pid} cannot be inspected: {exc.strerror or exc}"
    if owner != uid:
        return f"pid {pid} runs as uid {owner}, not as this service's workers ({uid})"
    try:
        if os.getpgid(pid) != pid:
            return f"pid {pid} does not lead its process group"
    except ProcessLookupError:
        return f"pid {pid} is gone"
    wanted = f"{Env.CONTROL_DIR}={control_dir}".encode()
    if wanted not in environ:
        return f"pid {pid} was not started for {control_dir}"
    return None


def has_capability(bit: int) -> bool:
    """Whether this process holds capability `bit` in its effective set."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def split_problem(workers_of_another_account: bool) -> str | None:
    """Why CRIU cannot dump workers of another account here, or None: reading their
    resource limits takes CAP_SYS_RESOURCE (some sandboxes' root lacks it)."""
    if workers_of_another_account and not has_capability(CAP_SYS_RESOURCE):
        return ("CRIU needs CAP_SYS_RESOURCE to read the limits of workers of another "
                "account, and this supervisor lacks it")
    return None
