"""Marker files in a worker's control directory: names (`protocol.Marker`), formats, and how
both sides read and write them (Dynamo's G4 protocol).

Written by write-then-rename (mode 0600), so a watcher sees only complete files; read
without following symlinks, refusing anything that is not a small regular file of this
service's user (or root). A malformed marker raises MarkerError: the caller reports it and
ignores the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynamo_vllm.contract.protocol import Marker

# Same rule as the checkpoint store's directory names: never a path.
_HASH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def hash_problem(value: str) -> str | None:
    """Why `value` cannot name a checkpoint (it would be a path), or None."""
    if "/" in value or "\\" in value or ".." in value:
        return f"{value!r} contains '/', '\\' or '..'"
    if not _HASH.match(value):
        return f"{value!r} is not 1-128 letters, digits, '.', '_' or '-'"
    return None


class MarkerError(Exception):
    """A marker that is not a small regular file, or not what its name says."""


def read_marker(directory: Path, name: str, writer: int | None = None) -> bytes | None:
    """A marker's content; None when absent. Refuses symlinks, non-files, huge files, and
    files another user (not root, nor `writer`: the worker's account, for a supervisor that
    runs as root) owns or could have written: the directory is the service user's."""
    try:
        fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the name is a symlink
            raise MarkerError(f"{name} is a symlink (refused)") from None
        raise MarkerError(f"{name}: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)  # before fdopen, which refuses a directory with its own error
        raise MarkerError(f"{name} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > Marker.MAX_BYTES:
            raise MarkerError(f"{name} is {info.st_size} bytes (more than {Marker.MAX_BYTES})")
        if info.st_uid not in (os.geteuid(), 0, writer):  # root's checkpointer may answer too
            raise MarkerError(f"{name} belongs to uid {info.st_uid}, not to this service's "
                              f"uid {os.geteuid()} or root (refused)")
        if info.st_mode & 0o022:
            raise MarkerError(f"{name} is writable by other users "
                              f"(mode {stat.S_IMODE(info.st_mode):o}; refused)")
        return f.read(Marker.MAX_BYTES + 1)


def write_marker(directory: Path, name: str, content: bytes,
                 owner: tuple[int, int] | None = None) -> None:
    """Write-then-rename, so a watcher sees a complete file (a moved-in event), mode 0600;
    `owner` (uid, gid): the reader's, when a root supervisor answers an unprivileged worker."""
    tmp = directory / f".{name}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    if owner is not None:
        os.fchown(fd, *owner)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / name)


def remove_markers(directory: Path, names: tuple[str, ...]) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(directory / name)


def parse_ready(content: bytes) -> dict[str, Any]:
    """A ready marker as the worker writes it: {"pid": int, "hash": str, ...}."""
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MarkerError(f"{Marker.READY} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MarkerError(f"{Marker.READY} is not a JSON object")
    pid, checkpoint_hash = data.get("pid"), data.get("hash")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
        raise MarkerError(f"{Marker.READY}: pid must be a process id, got {pid!r}")
    if not isinstance(checkpoint_hash, str) or hash_problem(checkpoint_hash):
        raise MarkerError(f"{Marker.READY}: hash {checkpoint_hash!r} is not a checkpoint hash")
    return data


def parse_restore_context(content: bytes, allowed: frozenset[str]
                          ) -> tuple[dict[str, str | None], list[str]]:
    """`{"env": {NAME: value|null}}` → (the allowed changes, warnings about ignored names).

    Raises MarkerError when the document is malformed (then none of it applies)."""
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MarkerError(f"{Marker.RESTORE_CONTEXT} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("env", {}), dict):
        raise MarkerError(f'{Marker.RESTORE_CONTEXT} must be {{"env": {{NAME: value|null}}}}')
    changes: dict[str, str | None] = {}
    warnings: list[str] = []
    for name, value in data.get("env", {}).items():
        if value is not None and not isinstance(value, str):
            raise MarkerError(f"{Marker.RESTORE_CONTEXT}: {name}: the value must be a string "
                              f"or null, got {type(value).__name__}")
        if name not in allowed:
            warnings.append(f"{Marker.RESTORE_CONTEXT}: {name} is not allow-listed; ignored")
            continue
        changes[name] = value
    return changes, warnings


def restore_context_document(env: Mapping[str, str | None]) -> bytes:
    """What a checkpointer writes (sorted and compact, as Dynamo writes it)."""
    return json.dumps({"env": dict(sorted(env.items()))}, separators=(",", ":")).encode()
