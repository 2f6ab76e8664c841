"""The worker's side of checkpoint/restore (CHREK), after Dynamo's newest protocol (G4).

A worker in snapshot mode warms its engine up, pauses it, puts it to sleep, and writes
`ready-for-snapshot` into its control directory. Then it waits, polling every 100 ms, for the
checkpointer's answer:

- `restore-complete`: it was restored from a checkpoint (or the checkpointer let the live
  process go on): refresh the allow-listed environment from `restore-context.json`, undo the
  capture environment, wake, resume, register and serve;
- `snapshot-complete`: the checkpoint is taken and this process is to end: exit with
  `ExitCode.CHECKPOINTED`.

No answer within `checkpoint.timeout` is treated like `restore-complete` without a context:
the worker serves, cold. Markers are read without following symlinks, and a malformed one is
reported and ignored. This module imports nothing heavy.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import re
import stat
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .protocol import Env, Marker

log = logging.getLogger(__name__)

POLL_S = 0.1  # Dynamo's SENTINEL_POLL_INTERVAL_SEC

# Set before the engine starts, as Dynamo sets it for a capture on GPUs: CRIU restores only
# loopback sockets, cuda-checkpoint cannot handle cuMem allocations, and torch's NCCL
# watchdog kills restored processes. Undone after a restore, for the processes started later.
CAPTURE_ENV: Mapping[str, str] = {
    "GLOO_SOCKET_IFNAME": "lo",
    "NCCL_SOCKET_IFNAME": "lo",
    "NCCL_CUMEM_ENABLE": "0",
    "NCCL_P2P_DISABLE": "1",
    "NCCL_NVLS_ENABLE": "0",
    "NCCL_IB_DISABLE": "1",
    "NCCL_RAS_ENABLE": "0",
    "TORCH_NCCL_ENABLE_MONITORING": "0",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
    "HF_HUB_OFFLINE": "1",
}

# What a restored worker may take from restore-context.json: Dynamo's non-secret list, plus
# the names the supervisor gives its workers. CRIU brings back the checkpoint-time values.
ALLOWED_ENV = frozenset({
    # identity
    "DYN_NAMESPACE", "DYN_COMPONENT", "DYN_PARENT_DGD_K8S_NAME", "DYN_PARENT_DGD_K8S_NAMESPACE",
    "POD_NAME", "POD_NAMESPACE", "POD_UID", "DYN_NAMESPACE_WORKER_SUFFIX",
    # runtime
    "DYN_DISCOVERY_BACKEND", "DYN_REQUEST_PLANE", "DYN_EVENT_PLANE", "DYN_EVENT_PLANE_HOST",
    "NATS_SERVER", "ETCD_ENDPOINTS", "DYN_SYSTEM_PORT", "DYN_HEALTH_CHECK_ENABLED",
    "DYN_SYSTEM_STARTING_HEALTH_STATUS", "DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS",
    "DYN_SYSTEM_HOST", "DYN_SYSTEM_HEALTH_PATH", "DYN_SYSTEM_LIVE_PATH",
    "DYN_KUBE_DISCOVERY_MODE", "CONTAINER_NAME",
    # other
    "ENGINE_ID", "FAILOVER_LOCK_PATH", "DYN_VLLM_GMS_SHADOW_MODE", "DYN_GMS_USE_V1",
    "MODEL_EXPRESS_URL", "PROMETHEUS_ENDPOINT",
    # the supervisor's
    Env.SUPERVISOR_PID, Env.INSTANCE, Env.DISCOVERY_DIR,
})

# Same rule as the checkpoint store's directory names: never a path.
_HASH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def hash_problem(value: str) -> str | None:
    """Why `value` cannot name a checkpoint (it would be a path), or None."""
    if "/" in value or "\\" in value or ".." in value:
        return f"{value!r} contains '/', '\\' or '..'"
    if not _HASH.match(value):
        return f"{value!r} is not 1-128 letters, digits, '.', '_' or '-'"
    return None


class SnapshotConfigError(Exception):
    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


class MarkerError(Exception):
    """A marker that is not a small regular file, or not what its name says."""


@dataclass(frozen=True)
class SnapshotSettings:
    control_dir: Path
    checkpoint_hash: str
    at_start: bool
    timeout: float
    sleep_level: int
    env_allow: frozenset[str] = field(default_factory=frozenset)


def settings_from_env(environ: Mapping[str, str], timeout: float, sleep_level: int,
                      extra_allow: list[str] | None = None) -> SnapshotSettings | None:
    """The snapshot settings, None when neither mode is on; every problem listed at once."""
    start_dir = environ.get(Env.SNAPSHOT_CONTROL_DIR) or environ.get(Env.SNAPSHOT_CONTROL_DIR_ALT)
    request_dir = environ.get(Env.CONTROL_DIR)
    legacy = sorted(name for name in environ if name.startswith(Env.CHECKPOINT_PREFIX))
    if not start_dir and not request_dir:
        if legacy:
            raise SnapshotConfigError([
                f"{', '.join(legacy)} set, but not {Env.SNAPSHOT_CONTROL_DIR}: checkpoint "
                "mode needs the control directory (the file and signal protocols of older "
                "Dynamo releases are not supported)"])
        return None
    errors: list[str] = []
    if start_dir and request_dir and os.path.abspath(start_dir) != os.path.abspath(request_dir):
        errors.append(f"{Env.SNAPSHOT_CONTROL_DIR} and {Env.CONTROL_DIR} name different "
                      "directories")
    directory = Path(start_dir or request_dir or "")
    problem = control_dir_problem(directory)
    if problem:
        errors.append(f"{Env.SNAPSHOT_CONTROL_DIR if start_dir else Env.CONTROL_DIR}: {problem}")
    checkpoint_hash = environ.get(Env.CHECKPOINT_HASH, "")
    if not checkpoint_hash:
        errors.append(f"{Env.CHECKPOINT_HASH}: required (which checkpoint this worker is for)")
    elif hash_problem(checkpoint_hash):
        errors.append(f"{Env.CHECKPOINT_HASH}: {hash_problem(checkpoint_hash)}")
    if errors:
        raise SnapshotConfigError(errors)
    return SnapshotSettings(directory, checkpoint_hash, bool(start_dir), timeout, sleep_level,
                            ALLOWED_ENV | frozenset(extra_allow or ()))


def control_dir_problem(directory: Path) -> str | None:
    if not directory.is_absolute():
        return f"{directory} is not an absolute path"
    try:
        info = os.lstat(directory)
    except OSError as exc:
        return f"{directory}: {exc.strerror}"
    if stat.S_ISLNK(info.st_mode):
        return f"{directory} is a symlink (refused)"
    if not stat.S_ISDIR(info.st_mode):
        return f"{directory} is not a directory"
    if info.st_uid != os.geteuid():
        return f"{directory} is not owned by this user (uid {os.geteuid()})"
    if info.st_mode & 0o022:
        return f"{directory} is writable by group or others (mode {info.st_mode & 0o777:o})"
    return None


def set_capture_env(environ: MutableMapping[str, str]) -> dict[str, str | None]:
    """Set the capture environment where unset; return what to put back after a restore."""
    previous: dict[str, str | None] = {}
    for name, value in CAPTURE_ENV.items():
        if name not in environ:
            previous[name] = None
            environ[name] = value
    return previous


def undo_capture_env(environ: MutableMapping[str, str], previous: Mapping[str, str | None]) -> None:
    for name, value in previous.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value


# ---------------------------------------------------------------------------- marker files

def read_marker(directory: Path, name: str) -> bytes | None:
    """A marker's content; None when absent. Refuses symlinks, non-files, huge files, and
    files another user (not root) owns or could have written: the directory is the service
    user's."""
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
        if info.st_uid not in (os.geteuid(), 0):  # root's checkpointer may answer too
            raise MarkerError(f"{name} belongs to uid {info.st_uid}, not to this service's "
                              f"uid {os.geteuid()} or root (refused)")
        if info.st_mode & 0o022:
            raise MarkerError(f"{name} is writable by other users "
                              f"(mode {stat.S_IMODE(info.st_mode):o}; refused)")
        return f.read(Marker.MAX_BYTES + 1)


def write_marker(directory: Path, name: str, content: bytes) -> None:
    """Write-then-rename, so a watcher sees a complete file (a moved-in event), mode 0600."""
    tmp = directory / f".{name}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
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


def apply_env_changes(environ: MutableMapping[str, str], changes: Mapping[str, str | None]) -> None:
    for name, value in changes.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value


def restore_context_document(env: Mapping[str, str | None]) -> bytes:
    """What a checkpointer writes (sorted and compact, as Dynamo writes it)."""
    return json.dumps({"env": dict(sorted(env.items()))}, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------- waiting

class Outcome(enum.StrEnum):
    RESTORED = "restored"
    CHECKPOINTED = "checkpointed"
    TIMED_OUT = "timed_out"


@dataclass
class Answer:
    outcome: Outcome
    env_changes: dict[str, str | None] = field(default_factory=dict)
    waited_s: float = 0.0


async def wait_for_checkpointer(settings: SnapshotSettings, worker: int) -> Answer:
    """Write `ready-for-snapshot` and wait for the checkpointer's answer.

    Every sentinel is removed at the end, whatever the answer (Dynamo's `finally`)."""
    directory = settings.control_dir
    remove_markers(directory, (Marker.RESTORE_COMPLETE, Marker.SNAPSHOT_COMPLETE))
    ready = {"pid": os.getpid(), "hash": settings.checkpoint_hash, "worker": worker,
             "time": time.time()}
    write_marker(directory, Marker.READY, json.dumps(ready).encode())
    log.info("ready for a checkpoint (%s in %s); waiting up to %.0f s", Marker.READY,
             directory, settings.timeout)
    started = time.monotonic()
    try:
        while time.monotonic() - started < settings.timeout:
            try:
                if read_marker(directory, Marker.SNAPSHOT_COMPLETE) is not None:
                    return Answer(Outcome.CHECKPOINTED, waited_s=time.monotonic() - started)
                if read_marker(directory, Marker.RESTORE_COMPLETE) is not None:
                    return Answer(Outcome.RESTORED, _restore_context(settings),
                                  time.monotonic() - started)
            except MarkerError as exc:
                log.warning("control directory: %s; ignored", exc)
                remove_markers(directory, (Marker.RESTORE_COMPLETE, Marker.SNAPSHOT_COMPLETE))
            await asyncio.sleep(POLL_S)
        log.warning("no answer from the checkpointer within %.0f s: serving without a "
                    "checkpoint", settings.timeout)
        return Answer(Outcome.TIMED_OUT, waited_s=time.monotonic() - started)
    finally:
        remove_markers(directory, (Marker.READY, Marker.RESTORE_COMPLETE,
                                   Marker.SNAPSHOT_COMPLETE, Marker.RESTORE_CONTEXT))


def _restore_context(settings: SnapshotSettings) -> dict[str, str | None]:
    try:
        content = read_marker(settings.control_dir, Marker.RESTORE_CONTEXT)
        if content is None:
            return {}
        changes, warnings = parse_restore_context(content, settings.env_allow)
    except MarkerError as exc:
        log.warning("%s; keeping the environment as it is", exc)
        return {}
    for warning in warnings:
        log.warning("%s", warning)
    return changes


def set_parent_death_signal(signum: int) -> None:
    """PR_SET_PDEATHSIG: 0 clears it. Cleared while waiting for a checkpoint: CRIU restores
    it, and the restored process's first parent (criu itself) exits at once."""
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signum, 0, 0, 0)
