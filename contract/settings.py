"""The settings of an instance config: one dataclass per TOML table, each setting with its
default, its documentation, its check and the process that reads it (its scope).

`config init` writes its commented file from these; `config check` reports every problem
with its key; the worker's view of a config (`config.worker_view`) is derived from scopes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from dynamo_vllm.contract.setting_base import (  # noqa: F401 (Scope, scope_of: re-exported)
    Check,
    Scope,
    scope_of,
)
from dynamo_vllm.contract.setting_base import absolute_or_empty as _absolute_or_empty
from dynamo_vllm.contract.setting_base import gpu_list as _gpu_list
from dynamo_vllm.contract.setting_base import labels as _labels
from dynamo_vllm.contract.setting_base import log_level as _log_level
from dynamo_vllm.contract.setting_base import non_negative as _non_negative
from dynamo_vllm.contract.setting_base import port as _port
from dynamo_vllm.contract.setting_base import positive as _positive
from dynamo_vllm.contract.setting_base import setting as _setting


@dataclass(frozen=True)
class ModelSection:
    path: str = _setting("", "Directory of the model (config.json, weights, tokenizer).")
    served_name: str = _setting("", "Name clients use in requests; default: the directory name.")


@dataclass(frozen=True)
class WorkersSection:
    count: int = _setting(1, "Worker processes (data-parallel replicas), one vLLM engine each.",
                          _positive, scope=Scope.SUPERVISOR)
    host: str = _setting("127.0.0.1", "Address the workers' HTTP APIs bind to "
                                      "(loopback: local only).")
    base_port: int = _setting(8100, "Worker i listens on base_port + i.", _port)
    gpus_per_worker: int = _setting(0, "GPUs given to each worker (0: the CPU engine).",
                                    _non_negative)
    min_ready: int = _setting(0, "Workers that must serve for the instance to be ready "
                                 "(0: all of them).", _non_negative, scope=Scope.SUPERVISOR)
    drain_timeout: float = _setting(30.0, "Seconds a stopping worker lets requests in flight "
                                          "finish before it stops the engine.", _non_negative)
    control_from_network: bool = _setting(False, "Let clients that are not on loopback call "
                                                 "the control routes (/engine/sleep...).")
    control_token_file: str = _setting("", "File holding a bearer token that every "
                                           "state-changing route requires (Authorization: "
                                           "Bearer ...), the supervisor's included; mode 600.",
                                       _absolute_or_empty)
    user: str = _setting("", "Account the workers and the frontend run as when the supervisor "
                             "runs as root (the checkpoint drop-in sets "
                             "DYNAMO_VLLM_WORKER_USER=dynamo-vllm): no capabilities, "
                             "no_new_privs. Empty: the supervisor's own account.",
                         scope=Scope.SUPERVISOR)
    stop_timeout: float = _setting(90.0, "Seconds the supervisor waits for a stopping worker "
                                         "before it kills its process group.", _positive,
                                   scope=Scope.SUPERVISOR)
    start_timeout: float = _setting(900.0, "Seconds a worker may take to serve before it "
                                           "counts as failed to start.", _positive,
                                    scope=Scope.SUPERVISOR)
    python: str = _setting("", "Interpreter for the workers; default: the engine venv's "
                               "(dynamo-vllm engine install) if there is one, else the "
                               "supervisor's own.")
    gpus: list[int] = _setting(None, "GPU indices to share out (default: every GPU found).",
                               _gpu_list)
    restart_backoff: float = _setting(1.0, "First delay before restarting a failed worker; "
                                           "doubles on each failure, with jitter.", _positive,
                                      scope=Scope.SUPERVISOR)
    restart_backoff_max: float = _setting(60.0, "Longest delay between restarts.", _positive,
                                          scope=Scope.SUPERVISOR)
    crash_loop_restarts: int = _setting(5, "Restarts within crash_loop_window after which a "
                                           "worker is given up.", _positive, scope=Scope.SUPERVISOR)
    crash_loop_window: float = _setting(300.0, "Seconds over which restarts are counted.",
                                        _positive, scope=Scope.SUPERVISOR)


@dataclass(frozen=True)
class HealthSection:
    interval: float = _setting(2.0, "Seconds between engine health checks (0 disables).",
                               _non_negative)
    check_timeout: float = _setting(30.0, "Seconds one health check may take (0: no limit).",
                                    _non_negative)
    shutdown_timeout: float = _setting(60.0, "Seconds a dead engine's shutdown may take before "
                                             "its processes are killed (0: no limit).",
                                       _non_negative)
    canary: bool = _setting(True, "Send a one-token request when the engine has been idle, to "
                                  "find a hung engine.")
    canary_idle: float = _setting(5.0, "Seconds without engine progress before a canary is sent.",
                                  _positive)
    canary_timeout: float = _setting(5.0, "Seconds a canary may take before it counts as failed "
                                          "(above stall_floor, so the stall check judges a "
                                          "canary stuck in a hung engine first).", _positive)
    canary_failures: int = _setting(3, "Consecutive canary failures that make the worker "
                                       "unhealthy.", _positive)
    stall_floor: float = _setting(3.0, "Seconds without an engine step, with requests in "
                                        "flight, that never count as a hang: the least bound "
                                        "of the stall check (0 disables it).", _non_negative)
    stall_factor: float = _setting(20.0, "The stall check's bound is this many times the "
                                         "engine's recent p99 step time when that is above "
                                         "stall_floor.", _positive)
    payload: dict[str, Any] = _setting(None, "Canary request: {prompt = \"...\"} or "
                                             "{token_ids = [...]}; default: the BOS token.")
    poll_interval: float = _setting(2.0, "Seconds between the supervisor's polls of each "
                                         "worker's /health.", _positive, scope=Scope.SUPERVISOR)
    poll_timeout: float = _setting(5.0, "Seconds a /health poll may take.", _positive,
                                   scope=Scope.SUPERVISOR)
    poll_failures: int = _setting(3, "Polls in a row without an answer after which a worker "
                                     "counts as hung and is killed.", _positive,
                                  scope=Scope.SUPERVISOR)


@dataclass(frozen=True)
class WatchdogSection:
    unready_grace: float = _setting(120.0, "Seconds below min_ready serving workers (after the "
                                           "first READY) before the supervisor stops sending "
                                           "WATCHDOG=1, so systemd restarts the service.",
                                    _positive, scope=Scope.SUPERVISOR)


@dataclass(frozen=True)
class MetricsSection:
    host: str = _setting("127.0.0.1", "Address of the supervisor's /metrics and /status "
                                      "(loopback: local only).", scope=Scope.SUPERVISOR)
    port: int = _setting(9400, "Port of the supervisor's /metrics and /status.", _port,
                         scope=Scope.SUPERVISOR)
    namespace: str = _setting("dynamo", "Value of the dynamo_namespace label.")
    component: str = _setting("backend", "Value of the dynamo_component label.")
    endpoint: str = _setting("generate", "Value of the dynamo_endpoint label.")
    labels: dict[str, str] = _setting(None, "Extra labels on every worker metric; they never "
                                            "replace the automatic ones.", _labels)


def _discovery_backend(value: Any) -> str | None:
    return None if value in ("file", "etcd", "none") else 'must be "file", "etcd" or "none"'


DEFAULT_ETCD_ENDPOINT = "http://127.0.0.1:2379"


def etcd_endpoints_problem(value: Any) -> str | None:
    for endpoint in value:
        if not re.match(r"^https?://[^/\s]+/?$", endpoint):
            return f"{endpoint!r} is not an http(s)://host:port URL"
    return None if value else "must list at least one endpoint"


def _lease_ttl(value: Any) -> str | None:
    # etcd grants at least 2 s; below 3 a single late keepalive loses the lease.
    return None if 3 <= value <= 3600 else "must be from 3 to 3600 seconds"


def _sleep_level(value: Any) -> str | None:
    return None if value in (0, 1, 2) else "must be 0, 1 or 2"


def _sleep_inflight(value: Any) -> str | None:
    return None if value in ("drain", "abort") else 'must be "drain" or "abort"'


@dataclass(frozen=True)
class DiscoverySection:
    backend: str = _setting("file", "Where serving workers are published: \"file\" (one JSON "
                                    "document per worker), \"etcd\" (keys under a lease) or "
                                    "\"none\".", _discovery_backend)
    path: str = _setting("", "Directory of the file backend's records (default: "
                             "<runtime dir>/endpoints).")
    etcd_endpoints: list[str] = _setting(None, "etcd client URLs (the v3 JSON gateway; "
                                               "default http://127.0.0.1:2379); env "
                                               "ETCD_ENDPOINTS overrides.", etcd_endpoints_problem)
    etcd_prefix: str = _setting("/dynamo-vllm/v1/instances", "Key prefix of the etcd "
                                "backend's records.")
    lease_ttl: int = _setting(10, "Seconds a dead worker's etcd key outlives its last "
                                  "keepalive.", _lease_ttl)
    etcd_ca_file: str = _setting("", "CA bundle that signs etcd's certificate (https:// "
                                     "endpoints); empty: the system's CAs.",
                                 _absolute_or_empty)
    etcd_cert_file: str = _setting("", "Client certificate for etcd, with etcd_key_file "
                                       "(etcd run with --client-cert-auth).",
                                   _absolute_or_empty)
    etcd_key_file: str = _setting("", "Private key of etcd_cert_file (no group or other "
                                      "permission bits).", _absolute_or_empty)
    etcd_user: str = _setting("", "etcd user, when etcd's authentication is on; the password "
                                  "is in etcd_password_file.")
    etcd_password_file: str = _setting("", "File holding etcd_user's password (no group or "
                                           "other permission bits).", _absolute_or_empty)

    @property
    def etcd_urls(self) -> list[str]:
        return list(self.etcd_endpoints or [DEFAULT_ETCD_ENDPOINT])


@dataclass(frozen=True)
class SleepSection:
    inflight: str = _setting("drain", "Requests in flight when a worker goes to sleep: "
                                      "\"drain\" (finish within drain_timeout, then abort the "
                                      "rest) or \"abort\" (abort at once, with an error).",
                             _sleep_inflight)
    drain_timeout: float = _setting(30.0, "Seconds requests in flight get before sleep aborts "
                                          "them.", _non_negative)
    idle_after: float = _setting(0.0, "Seconds without a request after which a worker goes to "
                                      "sleep by itself (0: never); a request that reaches it "
                                      "asleep wakes it and is served.", _non_negative)
    idle_level: int = _setting(1, "Sleep level of an idle sleep (0 pauses; 1 frees the weights "
                                  "and KV cache on GPUs; the CPU engine only pauses).",
                               _sleep_level)


def _absolute_paths(value: Any) -> str | None:
    for path in value:
        if not os.path.isabs(path):
            return f"{path!r} is not an absolute path"
    return None


# Roots that would let a request load files from anywhere on the system.
_SYSTEM_DIRS = {"/", "/etc", "/proc", "/sys", "/dev", "/root", "/boot", "/usr", "/bin",
                "/sbin", "/lib", "/lib64", "/var", "/run", "/home", "/tmp"}


def _adapter_roots(value: Any) -> str | None:
    problem = _absolute_paths(value)
    if problem:
        return problem
    for path in value:
        if os.path.normpath(path) in _SYSTEM_DIRS:
            return (f"{path!r} is a system directory: name the directory that holds the "
                    "adapters")
    return None


@dataclass(frozen=True)
class LoraSection:
    allowed_roots: list[str] = _setting(None, "Directories LoRA adapters may be loaded from at "
                                              "run time (POST /v1/load_lora_adapter); empty: "
                                              "loading at run time is off.", _adapter_roots)


def _keep(value: Any) -> str | None:
    return None if 1 <= value <= 100 else "must be from 1 to 100"


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _env_names(value: Any) -> str | None:
    for name in value:
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            return f"{name!r} is not an environment variable name"
    return None


@dataclass(frozen=True)
class CheckpointSection:
    enabled: bool = _setting(False, "Checkpoint/restore (CHREK): restore workers from a CRIU "
                                    "checkpoint instead of a cold start.")
    store: str = _setting("", "Directory of the checkpoints (default: $STATE_DIRECTORY/"
                              "checkpoints under systemd, else <runtime dir>/checkpoints). "
                              "Private to the service user.", _absolute_or_empty,
                          scope=Scope.SUPERVISOR)
    keep: int = _setting(2, "Complete checkpoints kept; older ones are removed.", _keep,
                         scope=Scope.SUPERVISOR)
    auto: bool = _setting(True, "Take a checkpoint after a cold start when none is stored for "
                                "the worker's current hash.", scope=Scope.SUPERVISOR)
    restore: bool = _setting(True, "Restore at start when a checkpoint for the current hash "
                                   "is stored.", scope=Scope.SUPERVISOR)
    criu: str = _setting("criu", "The CRIU binary (4.2 or newer on kernels from 6.16).",
                         scope=Scope.SUPERVISOR)
    criu_libdir: str = _setting("", "CRIU plugin directory (the CUDA plugin on GPUs); empty: "
                                    "CRIU's default.", _absolute_or_empty, scope=Scope.SUPERVISOR)
    timeout: float = _setting(600.0, "Seconds a dump or a restore may take; a worker waiting "
                                     "for its checkpoint resumes serving after this long.",
                              _positive)
    sleep_level: int = _setting(1, "Sleep level before a dump (1: weights offloaded and KV "
                                   "freed on GPUs; the CPU engine only pauses).", _sleep_level)
    env_allow: list[str] = _setting(None, "Extra environment names a restored worker refreshes "
                                          "from restore-context.json.", _env_names)


def _one_of(*allowed: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in allowed else "must be " + " or ".join(f'"{a}"' for a in allowed)
    return check


@dataclass(frozen=True)
class DynamoSection:
    enabled: bool = _setting(False, "Register every worker with Dynamo's runtime: it serves "
                                    "`generate` to Dynamo's frontend and KV router beside its "
                                    "own OpenAI port. Names: metrics.namespace, .component, "
                                    ".endpoint.")
    discovery_backend: str = _setting("file", "Dynamo's discovery: \"file\" (one machine) or "
                                              "\"etcd\" (discovery.etcd_endpoints); env "
                                              "DYN_DISCOVERY_BACKEND overrides.",
                                      _one_of("file", "etcd"))
    file_kv: str = _setting("", "Directory of Dynamo's file discovery, shared with the "
                                "frontend (default: Dynamo's, $TMPDIR/dynamo_store_kv); env "
                                "DYN_FILE_KV overrides.", _absolute_or_empty)
    request_plane: str = _setting("tcp", "Dynamo's request plane (tcp: no NATS); env "
                                         "DYN_REQUEST_PLANE overrides.", _one_of("tcp"))
    event_plane: str = _setting("zmq", "Dynamo's event plane for KV events and load (zmq: no "
                                       "NATS); env DYN_EVENT_PLANE overrides.", _one_of("zmq"))
    host: str = _setting("127.0.0.1", "Address the runtime's request and event planes bind "
                                      "and advertise (loopback: one machine; a fleet needs "
                                      "this node's address).")
    kv_events: bool = _setting(True, "Relay vLLM's KV cache events to Dynamo's KV router "
                                     "(needs prefix caching, vLLM's default).")


ROUTER_MODES = ("kv", "round-robin", "random", "power-of-two", "least-loaded")


def _frontend_args(value: Any) -> str | None:
    for key, arg in value.items():
        if not re.match(r"^[a-z][a-z0-9_-]*$", key):
            return f"{key!r} is not an argument name"
        if not isinstance(arg, (str, int, float, bool)):
            return f"{key}: a string, number or boolean"
    return None


@dataclass(frozen=True)
class FrontendSection:
    enabled: bool = _setting(False, "Run Dynamo's frontend (python -m dynamo.frontend) as a "
                                    "supervised child: one OpenAI port for the node's workers "
                                    "(needs [dynamo] enabled).", scope=Scope.SUPERVISOR)
    host: str = _setting("127.0.0.1", "Address of the frontend's OpenAI API (loopback: local "
                                      "only).", scope=Scope.SUPERVISOR)
    port: int = _setting(8000, "Port of the frontend's OpenAI API.", _port,
                         scope=Scope.SUPERVISOR)
    router_mode: str = _setting("kv", "How the frontend picks a worker: " +
                                ", ".join(ROUTER_MODES) + ".", _one_of(*ROUTER_MODES),
                                scope=Scope.SUPERVISOR)
    migration_limit: int = _setting(3, "Times a request cut by a failing worker moves on to "
                                       "another (0: never).", _non_negative,
                                    scope=Scope.SUPERVISOR)
    args: dict[str, Any] = _setting(None, "Further frontend arguments ([frontend.args], its "
                                          "own names), passed as --key value; its parser "
                                          "checks them at `config check`.", _frontend_args,
                                    scope=Scope.SUPERVISOR)


@dataclass(frozen=True)
class LoggingSection:
    level: str = _setting("info", "debug, info, warning or error.", _log_level,
                          scope=Scope.EVERYWHERE)


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "workers": WorkersSection,
    "health": HealthSection,
    "watchdog": WatchdogSection,
    "metrics": MetricsSection,
    "discovery": DiscoverySection,
    "sleep": SleepSection,
    "lora": LoraSection,
    "checkpoint": CheckpointSection,
    "dynamo": DynamoSection,
    "frontend": FrontendSection,
    "logging": LoggingSection,
}
