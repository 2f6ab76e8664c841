"""The worker's side of checkpoint/restore (CHREK), after Dynamo's newest protocol (G4); the
older environment-variable protocols (G1, G2) are in `chrek_env`.

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
import enum
import json
import logging
import os
import stat
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

from dynamo_vllm.agent.chrek_env import (
    READY_FILE,
    SIGNAL_FILE,
    EnvCheckpoint,
    Verdict,
    env_checkpoint,
    wait_env_checkpointer,
)
from dynamo_vllm.contract.markers import (
    MarkerError,
    hash_problem,
    parse_restore_context,
    read_marker,
    remove_markers,
    write_marker,
)
from dynamo_vllm.contract.protocol import Env, Marker

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

class SnapshotConfigError(Exception):
    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class SnapshotSettings:
    control_dir: Path
    checkpoint_hash: str
    at_start: bool
    timeout: float
    sleep_level: int
    env_allow: frozenset[str] = field(default_factory=frozenset)
    env_protocol: EnvCheckpoint | None = None
    """Set when older Dynamo tooling drives the worker by environment (chrek_env)."""


def settings_from_env(environ: Mapping[str, str], timeout: float, sleep_level: int,
                      extra_allow: list[str] | None = None) -> SnapshotSettings | None:
    """The snapshot settings, None when neither mode is on; every problem listed at once."""
    start_dir = environ.get(Env.SNAPSHOT_CONTROL_DIR) or environ.get(Env.SNAPSHOT_CONTROL_DIR_ALT)
    request_dir = environ.get(Env.CONTROL_DIR)
    legacy = sorted(name for name in environ if name.startswith(Env.CHECKPOINT_PREFIX))
    if not start_dir and not request_dir:
        spec, problems = env_checkpoint(environ)
        if problems:
            raise SnapshotConfigError(problems)
        if spec is not None:
            return SnapshotSettings(spec.ready_file.parent, environ.get(Env.CHECKPOINT_HASH, ""),
                                    True, timeout, sleep_level, frozenset(), spec)
        if legacy:
            raise SnapshotConfigError([
                f"{', '.join(legacy)} set, but no checkpoint protocol is on: set "
                f"{Env.SNAPSHOT_CONTROL_DIR} (the control directory), {SIGNAL_FILE} (signal "
                f"files) or {READY_FILE} (Unix signals)"])
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


def apply_env_changes(environ: MutableMapping[str, str], changes: Mapping[str, str | None]) -> None:
    for name, value in changes.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value


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
    if settings.env_protocol is not None:
        verdict, waited = await wait_env_checkpointer(settings.env_protocol, settings.timeout)
        # A failed checkpoint leaves the live process to serve, as no answer does.
        outcome = {Verdict.RESTORED: Outcome.RESTORED,
                   Verdict.CHECKPOINTED: Outcome.CHECKPOINTED}.get(verdict, Outcome.TIMED_OUT)
        return Answer(outcome, waited_s=waited)
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
