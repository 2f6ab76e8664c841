"""Every fact shared between the worker, the supervisor, systemd units and the docs.

Exit codes, worker states, HTTP routes, environment variable names and metric names live
here and nowhere else. This module imports nothing heavy: the supervisor reads it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final


class ExitCode(enum.IntEnum):
    """How a worker process ends; the supervisor decides what to do from this alone.

    1 (an uncaught Python exception) and 2 (a command-line usage error) keep their usual
    meaning and are treated as crashes.
    """

    STOPPED = 0
    """Stopped on request (SIGTERM/SIGINT): do not restart unless the supervisor wants to."""
    ENGINE_DEAD = 3
    """The engine died (EngineDeadError or a health check timed out): restart."""
    UNHEALTHY = 4
    """The engine is alive but answers nothing (the canary failed): restart."""
    CHECKPOINTED = 5
    """A checkpoint of this worker was taken and it was told to end: do not restart."""
    SERVICE_FAILED = 6
    """Supervisor only: it could not keep `min_ready` workers serving (every worker given
    up, or below min_ready past the grace period without a systemd watchdog)."""
    START_FAILED = 7
    """The engine failed to start for a reason a later try may not meet (a device busy, a
    file not there yet, a crash while loading): restart with backoff; the crash-loop limit
    bounds the tries. A start that cannot work (refused arguments, a KV cache that does not
    fit) is CONFIG instead."""
    CONFIG = 78
    """The configuration is wrong (sysexits EX_CONFIG): restarting cannot help.

    The systemd unit lists this code in RestartPreventExitStatus=.
    """

    @classmethod
    def describe(cls, code: int | None) -> str:
        """A short reason in words for an exit status (negative: killed by that signal)."""
        if code is None:
            return "running"
        if code < 0:
            import signal

            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        try:
            return _EXIT_REASONS[cls(code)]
        except ValueError:
            return f"crashed (exit status {code})"


_EXIT_REASONS = {
    ExitCode.STOPPED: "stopped on request",
    ExitCode.ENGINE_DEAD: "engine dead",
    ExitCode.UNHEALTHY: "engine hung (canary failed)",
    ExitCode.CHECKPOINTED: "checkpoint taken",
    ExitCode.START_FAILED: "engine failed to start",
    ExitCode.SERVICE_FAILED: "service failed",
    ExitCode.CONFIG: "bad config",
}


class WorkerState(enum.StrEnum):
    """What a worker reports on GET /health."""

    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    SLEEPING = "sleeping"
    UNHEALTHY = "unhealthy"
    DEAD = "dead"
    CHECKPOINT = "checkpoint"
    """Paused and waiting for a checkpoint (`ready-for-snapshot` written)."""


_ENDS = frozenset({WorkerState.DRAINING, WorkerState.DEAD, WorkerState.UNHEALTHY})
# The moves a worker's reported state may make; the worker logs any other as a bug.
WORKER_TRANSITIONS: Final[Mapping[WorkerState, frozenset[WorkerState]]] = MappingProxyType({
    WorkerState.LOADING: frozenset({WorkerState.SERVING, WorkerState.CHECKPOINT}) | _ENDS,
    WorkerState.SERVING: frozenset({WorkerState.SLEEPING, WorkerState.CHECKPOINT}) | _ENDS,
    # A checkpoint on request puts the engine to sleep, then waits for the checkpointer.
    WorkerState.SLEEPING: frozenset({WorkerState.SERVING, WorkerState.CHECKPOINT}) | _ENDS,
    WorkerState.CHECKPOINT: frozenset({WorkerState.SERVING}) | _ENDS,
    WorkerState.DRAINING: frozenset({WorkerState.DEAD, WorkerState.UNHEALTHY}),
    WorkerState.UNHEALTHY: frozenset({WorkerState.DEAD}),
    WorkerState.DEAD: frozenset(),
})


class Route:
    """HTTP routes that are ours (a worker's OpenAI routes are vLLM's)."""

    HEALTH = "/health"
    METRICS = "/metrics"
    ENGINE_SLEEP = "/engine/sleep"
    ENGINE_WAKE = "/engine/wake_up"
    ENGINE_IS_SLEEPING = "/engine/is_sleeping"
    ENGINE_CLEAR_KV = "/engine/clear_kv_blocks"
    ENGINE_SNAPSHOT = "/engine/snapshot"
    LOAD_LORA = "/v1/load_lora_adapter"
    UNLOAD_LORA = "/v1/unload_lora_adapter"
    WORKER_OPENAPI = "/dynamo-vllm/openapi.json"
    # The supervisor's
    STATUS = "/status"
    HEALTHZ = "/healthz"
    ENDPOINTS = "/endpoints"
    SERVICE_DISCOVERY = "/sd"
    CHECKPOINT = "/checkpoint"
    RESTORE = "/restore"
    OPENAPI = "/openapi.json"


class Env:
    """Environment variables read by the agent (Dynamo's names where Dynamo has one)."""

    HEALTH_CHECK_INTERVAL = "DYN_ENGINE_HEALTH_CHECK_INTERVAL"
    HEALTH_CHECK_TIMEOUT = "DYN_ENGINE_HEALTH_CHECK_TIMEOUT"
    HEALTH_SHUTDOWN_TIMEOUT = "DYN_ENGINE_HEALTH_SHUTDOWN_TIMEOUT"
    HEALTH_CHECK_PAYLOAD = "DYN_HEALTH_CHECK_PAYLOAD"
    CANARY_WAIT_TIME = "DYN_CANARY_WAIT_TIME"
    CANARY_REQUEST_TIMEOUT = "DYN_HEALTH_CHECK_REQUEST_TIMEOUT"
    PROMETHEUS_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
    # Set by the supervisor for its workers: the process that must outlive them, the
    # instance's name, and where the file discovery backend keeps its records.
    SUPERVISOR_PID = "DYNAMO_VLLM_SUPERVISOR_PID"
    INSTANCE = "DYNAMO_VLLM_INSTANCE"
    DISCOVERY_DIR = "DYNAMO_VLLM_DISCOVERY_DIR"
    # A CPU-engine worker's own CPUs (comma-separated): the agent keeps its whole process
    # tree on them from its first line (supervisor/devices.py split_cpus).
    WORKER_CPUS = "DYNAMO_VLLM_WORKER_CPUS"
    # A private directory for the worker's socket files (vLLM's KV event publisher), at the
    # same path in every life: a checkpoint holds the bound socket's path, and a restore
    # binds it again there. Emptied by the supervisor before each life.
    SOCKET_DIR = "DYNAMO_VLLM_SOCKET_DIR"
    # Dynamo's name: etcd endpoints, comma-separated (overrides discovery.etcd_endpoints).
    ETCD_ENDPOINTS = "ETCD_ENDPOINTS"
    # Checkpoint/restore (Dynamo's newest protocol, G4): the control directory turns snapshot
    # mode on at start; the split-out project's name is accepted too.
    SNAPSHOT_CONTROL_DIR = "DYN_SNAPSHOT_CONTROL_DIR"
    SNAPSHOT_CONTROL_DIR_ALT = "SNAPSHOT_CONTROL_DIR"
    CHECKPOINT_HASH = "DYN_CHECKPOINT_HASH"
    CHECKPOINT_LOCATION = "DYN_CHECKPOINT_LOCATION"
    CHECKPOINT_PATH = "DYN_CHECKPOINT_PATH"
    CHECKPOINT_PREFIX = "DYN_CHECKPOINT_"
    # Ours: the control directory of a worker that may be asked for a checkpoint while it
    # serves (POST /engine/snapshot); snapshot mode at start needs DYN_SNAPSHOT_CONTROL_DIR.
    CONTROL_DIR = "DYNAMO_VLLM_CONTROL_DIR"
    # Dynamo's runtime (the [dynamo] section): the names Dynamo's own components read, so a
    # worker and `python -m dynamo.frontend` started with one environment find each other.
    DYN_NAMESPACE = "DYN_NAMESPACE"
    DYN_DISCOVERY_BACKEND = "DYN_DISCOVERY_BACKEND"
    DYN_FILE_KV = "DYN_FILE_KV"
    DYN_REQUEST_PLANE = "DYN_REQUEST_PLANE"
    DYN_EVENT_PLANE = "DYN_EVENT_PLANE"
    # Set for every engine process: no telemetry leaves the machine, and vLLM's message
    # queue binds to loopback unless the operator says otherwise.
    ENGINE_DEFAULTS: Final[Mapping[str, str]] = MappingProxyType({
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_HOST_IP": "127.0.0.1",
    })


class Marker:
    """Files in a worker's control directory (Dynamo's G4 sentinel names)."""

    READY = "ready-for-snapshot"
    """Written by the worker: paused, asleep, ready to be dumped."""
    RESTORE_COMPLETE = "restore-complete"
    """Written by the checkpointer: wake up and serve (after a restore, or no dump taken)."""
    SNAPSHOT_COMPLETE = "snapshot-complete"
    """Written by the checkpointer: the checkpoint is taken, exit with CHECKPOINTED."""
    RESTORE_CONTEXT = "restore-context.json"
    """`{"env": {NAME: value|null}}`: allow-listed environment to refresh after a restore."""
    ALL = (READY, RESTORE_COMPLETE, SNAPSHOT_COMPLETE, RESTORE_CONTEXT)
    MAX_BYTES = 64 * 1024


class Metric:
    """Names of the metrics the worker publishes (Dynamo's names for the engine gauges)."""

    TOTAL_BLOCKS = "dynamo_component_total_blocks"
    CACHE_USAGE = "dynamo_component_gpu_cache_usage_percent"
    MODEL_LOAD_TIME = "dynamo_component_model_load_time_seconds"
    REQUESTS_RUNNING = "dynamo_component_requests_running"
    REQUESTS_WAITING = "dynamo_component_requests_waiting"
    CANARY_CHECKS = "dynamo_component_canary_checks"
    CANARY_LATENCY = "dynamo_component_canary_latency_seconds"
    HEALTH_STATE = "dynamo_component_health_state"
    DISCOVERY_ERRORS = "dynamo_component_discovery_errors"


class Label:
    """Hierarchical labels on every worker metric (Dynamo's names)."""

    NAMESPACE = "dynamo_namespace"
    COMPONENT = "dynamo_component"
    ENDPOINT = "dynamo_endpoint"
    MODEL = "model"
    DP_RANK = "dp_rank"
    WORKER = "worker"
    # Labels a user may not set: Prometheus gives them meaning of its own.
    RESERVED = frozenset({"le", "quantile"})


# The request id prefix of canary requests, so that logs and traces tell them apart.
CANARY_REQUEST_PREFIX = "dynamo-canary-"
