"""Shared memory of a worker's process tree: vLLM's message queues live in /dev/shm.

vLLM unlinks them on a clean shutdown only; a worker that was killed, hung or crashed
leaves them behind, holding memory until the next reboot. The supervisor notes which ones a
worker's tree uses while it runs, and removes them once the tree is gone. The checkpointer
keeps copies beside its images for the same reason (CRIU reopens them by name).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

SHM = Path("/dev/shm")


def tree_pids(pid: int) -> list[int]:
    import psutil

    try:
        return [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return [pid]


def fd_targets(pids: list[int]) -> Iterator[tuple[str, str]]:
    """(/proc/PID/fd/N, what it points to) for every open file of these processes; those
    that vanish while being read are skipped."""
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                yield f"{fd_dir}/{fd}", os.readlink(f"{fd_dir}/{fd}")


def shm_files(pids: list[int]) -> set[str]:
    """Files in /dev/shm these processes have open or mapped (vLLM's message queues): CRIU
    reopens them by name, and a worker that stopped cleanly has unlinked them."""
    found = set()
    for each in pids:
        with contextlib.suppress(OSError), open(f"/proc/{each}/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                path = parts[5].strip() if len(parts) == 6 else ""
                if path.startswith("/dev/shm/") and not path.endswith("(deleted)"):
                    found.add(path)
    found.update(link for _, link in fd_targets(pids)
                 if link.startswith("/dev/shm/") and not link.endswith("(deleted)"))
    return found


def remove(paths: set[str]) -> int:
    """Unlink what is left of `paths` (only files directly in /dev/shm); returns how many."""
    removed = 0
    for path in paths:
        candidate = Path(path)
        if candidate.parent != SHM:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(candidate)
            removed += 1
    return removed
