"""Where checkpoints live: `<store>/<hash>` exists only when complete.

A checkpoint is written under `<store>/tmp/<hash>` and renamed into place when complete
(Dynamo's agent does the same), so existence means complete and taking one twice is a no-op.
One checkpoint per hash at a time: an flock on `<store>/locks/<hash>` (held by the process
that dumps) refuses a second. The store is private to the service user (0700; images 0600,
since they hold process memory, secrets included), and nothing in it is followed through a
symlink. Retention keeps the newest `keep`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamo_vllm.contract.markers import hash_problem
from dynamo_vllm.supervisor.runtime_dir import RuntimeDirError, ensure_private_dir

METADATA = "metadata.json"
TMP = "tmp"
LOCKS = "locks"


class StoreError(Exception):
    """The store cannot be used, or a checkpoint cannot be taken there (with the reason)."""


class Busy(StoreError):
    """A checkpoint of this hash is being taken by someone else."""


@dataclass(frozen=True)
class Entry:
    checkpoint_hash: str
    state: str  # "complete" or "in progress"
    size_bytes: int
    created: float
    metadata: dict[str, Any]


def check_hash(checkpoint_hash: str) -> str:
    problem = hash_problem(checkpoint_hash)
    if problem:
        raise StoreError(f"refused checkpoint hash: {problem}")
    return checkpoint_hash


def _private_dir(path: Path) -> None:
    """Create `path` 0700, or check that it is a real directory of ours and make it 0700."""
    try:
        ensure_private_dir(path)
    except RuntimeDirError as exc:
        raise StoreError(str(exc)) from None
    except OSError as exc:
        raise StoreError(f"cannot create {path}: {exc.strerror}") from None


def tree_size(path: Path) -> int:
    """Bytes on disk (vLLM's /dev/shm queues are kept sparse: their holes take nothing)."""
    total = 0
    for root, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(root, name))
                total += min(info.st_size, info.st_blocks * 512)
    return total


def make_private(path: Path) -> None:
    """Directories 0700 and files 0600, without following links."""
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(root, name), 0o700, follow_symlinks=False)
        for name in files:
            full = os.path.join(root, name)
            with contextlib.suppress(OSError):
                if not os.path.islink(full):
                    os.chmod(full, 0o600)


class Staging:
    """A checkpoint being written: `path` to fill, then commit() or abort()."""

    def __init__(self, store: CheckpointStore, checkpoint_hash: str, lock_fd: int):
        self.store = store
        self.checkpoint_hash = checkpoint_hash
        self.path = store.root / TMP / checkpoint_hash
        self._lock_fd = lock_fd

    def commit(self, metadata: dict[str, Any]) -> Entry:
        """Write the metadata and rename into place. The caller made the images private
        (files CRIU checks by mode, such as copied metric files, keep theirs, under 0700)."""
        final = self.store.root / self.checkpoint_hash
        metadata = {**metadata, "hash": self.checkpoint_hash, "created": time.time()}
        try:
            metadata["size_bytes"] = tree_size(self.path)
            tmp = self.path / f".{METADATA}.tmp"
            with open(tmp, "w", opener=_private_opener) as f:
                json.dump(metadata, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / METADATA)
            if final.exists() or final.is_symlink():
                raise StoreError(f"{final} appeared while this checkpoint was written")
            os.rename(self.path, final)
            _fsync_dir(self.store.root)
        except OSError as exc:
            self.abort()
            raise StoreError(_os_reason("storing the checkpoint failed", exc)) from None
        except StoreError:
            self.abort()
            raise
        self._unlock()
        return Entry(self.checkpoint_hash, "complete", int(metadata["size_bytes"]),
                     float(metadata["created"]), metadata)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = -1


class CheckpointStore:
    def __init__(self, root: Path, keep: int):
        self.root = root
        self.keep = keep

    def prepare(self) -> list[str]:
        """Create the store (private), and remove what a crash left in tmp/. Returns the
        names removed."""
        _private_dir(self.root)
        _private_dir(self.root / TMP)
        _private_dir(self.root / LOCKS)
        removed = []
        for entry in os.scandir(self.root / TMP):
            if self._locked(entry.name):
                continue  # another process is writing it now
            removed.append(entry.name)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        return removed

    def path(self, checkpoint_hash: str) -> Path:
        return self.root / check_hash(checkpoint_hash)

    def has(self, checkpoint_hash: str) -> bool:
        path = self.path(checkpoint_hash)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return False
        return stat.S_ISDIR(info.st_mode) and (path / METADATA).is_file()

    def begin(self, checkpoint_hash: str) -> Staging:
        """Start writing a checkpoint; Busy when one of this hash is being written."""
        check_hash(checkpoint_hash)
        fd = os.open(self.root / LOCKS / checkpoint_hash,
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise Busy(f"a checkpoint of {checkpoint_hash} is being taken already") from None
            raise
        staging = Staging(self, checkpoint_hash, fd)
        shutil.rmtree(staging.path, ignore_errors=True)
        try:
            staging.path.mkdir(mode=0o700)
        except OSError as exc:
            staging.abort()
            raise StoreError(_os_reason(f"cannot create {staging.path}", exc)) from None
        return staging

    def _locked(self, checkpoint_hash: str) -> bool:
        try:
            fd = os.open(self.root / LOCKS / checkpoint_hash,
                         os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    def entries(self) -> list[Entry]:
        """Complete checkpoints, newest first, then those in progress."""
        if not self.root.is_dir():
            return []
        complete, partial = [], []
        for item in os.scandir(self.root):
            if item.name in (TMP, LOCKS) or not item.is_dir(follow_symlinks=False):
                continue
            if hash_problem(item.name):
                continue
            metadata = _read_metadata(Path(item.path))
            if metadata is None:
                continue
            complete.append(Entry(item.name, "complete", int(metadata.get("size_bytes", 0)),
                                  float(metadata.get("created", 0.0)), metadata))
        tmp = self.root / TMP
        if tmp.is_dir():
            for item in os.scandir(tmp):
                if item.is_dir(follow_symlinks=False):
                    partial.append(Entry(item.name, "in progress", tree_size(Path(item.path)),
                                         item.stat(follow_symlinks=False).st_mtime, {}))
        complete.sort(key=lambda e: e.created, reverse=True)
        return complete + partial

    def prune(self, protect: set[str]) -> list[str]:
        """Keep the newest `keep` complete checkpoints (and every hash in `protect`)."""
        removed = []
        complete = [e for e in self.entries() if e.state == "complete"]
        for entry in complete[self.keep:]:
            if entry.checkpoint_hash in protect:
                continue
            self.remove(entry.checkpoint_hash)
            removed.append(entry.checkpoint_hash)
        return removed

    def remove(self, checkpoint_hash: str) -> None:
        path = self.path(checkpoint_hash)
        # Renamed out of place first: a half-deleted checkpoint must never look complete.
        doomed = self.root / TMP / f".removing-{checkpoint_hash}-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _read_metadata(path: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(path / METADATA, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        try:
            data = json.load(f)
        except ValueError:
            return None
    return data if isinstance(data, dict) else None


def read_metadata(store: CheckpointStore, checkpoint_hash: str) -> dict[str, Any]:
    data = _read_metadata(store.path(checkpoint_hash))
    if data is None:
        raise StoreError(f"checkpoint {checkpoint_hash} has no readable {METADATA}")
    return data


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW, 0o600)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_reason(what: str, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"{what}: no space left on the checkpoint store's filesystem"
    return f"{what}: {exc.strerror or exc}"
