"""Where an instance keeps its private runtime files (metric files, the effective config)."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


class RuntimeDirError(Exception):
    pass


# Names the runtime directory for `run` (like --runtime-dir) and for the CLI commands that
# look for the instance's control token in it.
RUNTIME_DIR_ENV = "DYNAMO_VLLM_RUNTIME_DIR"


def _candidates(instance: str) -> list[Path]:
    found: list[Path] = []
    systemd = os.environ.get("RUNTIME_DIRECTORY")
    if systemd:  # RuntimeDirectory= in the unit; may list several, colon-separated
        found.append(Path(systemd.split(":")[0]))
    if os.geteuid() == 0:
        found.append(Path("/run/dynamo-vllm") / instance)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        found.append(Path(xdg) / "dynamo-vllm" / instance)
    found.append(Path(f"/tmp/dynamo-vllm-{os.geteuid()}") / instance)
    return found


def _check_parent(parent: Path) -> None:
    """Whoever owns the parent can rename our directory away and put theirs in its place:
    it must be ours or root's, and writable by no one else (a sticky /tmp excepted)."""
    info = os.lstat(parent)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise RuntimeDirError(f"{parent}: not a directory (symlinks are refused)")
    if info.st_uid not in (os.geteuid(), 0):
        raise RuntimeDirError(f"{parent}: owned by uid {info.st_uid}, neither this user "
                              "nor root")
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        raise RuntimeDirError(f"{parent}: writable by group or others "
                              f"(mode {info.st_mode & 0o777:o})")


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (mode 0700) or accept it only if it is ours, private and no symlink, in
    a parent no one else controls."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_parent(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise RuntimeDirError(f"{path}: not a directory (symlinks are refused)")
    if info.st_uid != os.geteuid():
        raise RuntimeDirError(f"{path}: owned by uid {info.st_uid}, not by this user")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def private_runtime_dir(instance: str, given: Path | None = None) -> Path:
    if given is not None:
        return ensure_private_dir(given)
    errors = []
    for candidate in _candidates(instance):
        try:
            return ensure_private_dir(candidate)
        except (OSError, RuntimeDirError) as exc:
            errors.append(f"{candidate}: {exc}")
    raise RuntimeDirError("no usable runtime directory: " + "; ".join(errors))


def runtime_dirs_to_search(instance: str) -> list[Path]:
    """Where a running instance's runtime directory may be, for the CLI: the one named by
    DYNAMO_VLLM_RUNTIME_DIR, the unit's (/run/dynamo-vllm/NAME, whoever asks), then the
    places `run` falls back to outside systemd."""
    named = os.environ.get(RUNTIME_DIR_ENV)
    found = [Path(named)] if named else []
    found.append(Path("/run/dynamo-vllm") / instance)
    found += [p for p in _candidates(instance) if p not in found]
    return found
