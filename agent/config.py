"""The instance configuration: one TOML file per instance, validated key by key.

Every error names its key (`workers.count: must be an integer ≥ 1, got "two"`), all of them
are reported at once, and the caller exits with `ExitCode.CONFIG`. Environment overrides
(Dynamo's `DYN_*` names) are applied on top; an invalid override is ignored with a warning.

Both the supervisor and the worker read this module, so it imports nothing heavy.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .payload import HealthPayload, PayloadError, parse_payload, parse_payload_env
from .protocol import Env, Label


class ConfigError(Exception):
    """One or more configuration errors, each as `key: problem`."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


Check = Callable[[Any], str | None]


def _setting(default: Any, doc: str, check: Check | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "check": check})


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be ≥ 0 (0 disables)"


def _port(value: Any) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port from 1 to 65535"


def _gpu_list(value: Any) -> str | None:
    if len(set(value)) != len(value):
        return "lists a GPU twice"
    return None


def _log_level(value: Any) -> str | None:
    levels = ("debug", "info", "warning", "error")
    return None if value in levels else f"must be one of {', '.join(levels)}"


_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _labels(value: Any) -> str | None:
    for name, label_value in value.items():
        if not _LABEL_NAME.match(name) or name.startswith("__"):
            return f"{name!r} is not a valid Prometheus label name"
        if name in Label.RESERVED:
            return f"{name!r} is reserved by Prometheus"
        if not isinstance(label_value, str):
            return f"{name}: label values must be strings"
    return None


def _absolute_or_empty(value: Any) -> str | None:
    return None if not value or os.path.isabs(value) else f"{value!r} is not an absolute path"


@dataclass(frozen=True)
class ModelSection:
    path: str = _setting("", "Directory of the model (config.json, weights, tokenizer).")
    served_name: str = _setting("", "Name clients use in requests; default: the directory name.")


@dataclass(frozen=True)
class WorkersSection:
    count: int = _setting(1, "Worker processes (data-parallel replicas), one vLLM engine each.",
                          _positive)
    host: str = _setting("127.0.0.1", "Address the workers' HTTP APIs bind to "
                                      "(loopback: local only).")
    base_port: int = _setting(8100, "Worker i listens on base_port + i.", _port)
    gpus_per_worker: int = _setting(0, "GPUs given to each worker (0: the CPU engine).",
                                    _non_negative)
    min_ready: int = _setting(0, "Workers that must serve for the instance to be ready "
                                 "(0: all of them).", _non_negative)
    drain_timeout: float = _setting(30.0, "Seconds a stopping worker lets requests in flight "
                                          "finish before it stops the engine.", _non_negative)
    control_from_network: bool = _setting(False, "Let clients that are not on loopback call "
                                                 "the control routes (/engine/sleep...).")
    control_token_file: str = _setting("", "File holding a bearer token that every "
                                           "state-changing route requires (Authorization: "
                                           "Bearer ...), the supervisor's included; mode 600.",
                                       _absolute_or_empty)
    stop_timeout: float = _setting(90.0, "Seconds the supervisor waits for a stopping worker "
                                         "before it kills its process group.", _positive)
    start_timeout: float = _setting(900.0, "Seconds a worker may take to serve before it "
                                           "counts as failed to start.", _positive)
    python: str = _setting("", "Interpreter for the workers; default: the engine venv's "
                               "(dynamo-vllm engine install) if there is one, else the "
                               "supervisor's own.")
    gpus: list[int] = _setting(None, "GPU indices to share out (default: every GPU found).",
                               _gpu_list)
    restart_backoff: float = _setting(1.0, "First delay before restarting a failed worker; "
                                           "doubles on each failure, with jitter.", _positive)
    restart_backoff_max: float = _setting(60.0, "Longest delay between restarts.", _positive)
    crash_loop_restarts: int = _setting(5, "Restarts within crash_loop_window after which a "
                                           "worker is given up.", _positive)
    crash_loop_window: float = _setting(300.0, "Seconds over which restarts are counted.",
                                        _positive)


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
    canary_idle: float = _setting(10.0, "Seconds without engine progress before a canary is sent.",
                                  _positive)
    canary_timeout: float = _setting(3.0, "Seconds a canary may take before it counts as failed.",
                                     _positive)
    canary_failures: int = _setting(3, "Consecutive canary failures that make the worker "
                                       "unhealthy.", _positive)
    payload: dict[str, Any] = _setting(None, "Canary request: {prompt = \"...\"} or "
                                             "{token_ids = [...]}; default: the BOS token.")
    poll_interval: float = _setting(2.0, "Seconds between the supervisor's polls of each "
                                         "worker's /health.", _positive)
    poll_timeout: float = _setting(5.0, "Seconds a /health poll may take.", _positive)
    poll_failures: int = _setting(3, "Polls in a row without an answer after which a worker "
                                     "counts as hung and is killed.", _positive)


@dataclass(frozen=True)
class WatchdogSection:
    unready_grace: float = _setting(120.0, "Seconds below min_ready serving workers (after the "
                                           "first READY) before the supervisor stops sending "
                                           "WATCHDOG=1, so systemd restarts the service.",
                                    _positive)


@dataclass(frozen=True)
class MetricsSection:
    host: str = _setting("127.0.0.1", "Address of the supervisor's /metrics and /status "
                                      "(loopback: local only).")
    port: int = _setting(9400, "Port of the supervisor's /metrics and /status.", _port)
    namespace: str = _setting("dynamo", "Value of the dynamo_namespace label.")
    component: str = _setting("backend", "Value of the dynamo_component label.")
    endpoint: str = _setting("generate", "Value of the dynamo_endpoint label.")
    labels: dict[str, str] = _setting(None, "Extra labels on every worker metric; they never "
                                            "replace the automatic ones.", _labels)


def _discovery_backend(value: Any) -> str | None:
    return None if value in ("file", "etcd", "none") else 'must be "file", "etcd" or "none"'


DEFAULT_ETCD_ENDPOINT = "http://127.0.0.1:2379"


def _etcd_endpoints(value: Any) -> str | None:
    for endpoint in value:
        if not re.match(r"^https?://[^/\s]+/?$", endpoint):
            return f"{endpoint!r} is not an http(s)://host:port URL"
    return None if value else "must list at least one endpoint"


def _lease_ttl(value: Any) -> str | None:
    # etcd grants at least 2 s; below 3 a single late keepalive loses the lease.
    return None if 3 <= value <= 3600 else "must be from 3 to 3600 seconds"


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
                                               "ETCD_ENDPOINTS overrides.", _etcd_endpoints)
    etcd_prefix: str = _setting("/dynamo-vllm/v1/instances", "Key prefix of the etcd "
                                "backend's records.")
    lease_ttl: int = _setting(10, "Seconds a dead worker's etcd key outlives its last "
                                  "keepalive.", _lease_ttl)

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


def _absolute_paths(value: Any) -> str | None:
    for path in value:
        if not os.path.isabs(path):
            return f"{path!r} is not an absolute path"
    return None


@dataclass(frozen=True)
class LoraSection:
    allowed_roots: list[str] = _setting(None, "Directories LoRA adapters may be loaded from at "
                                              "run time (POST /v1/load_lora_adapter); empty: "
                                              "loading at run time is off.", _absolute_paths)


def _keep(value: Any) -> str | None:
    return None if 1 <= value <= 100 else "must be from 1 to 100"


def _sleep_level(value: Any) -> str | None:
    return None if value in (0, 1, 2) else "must be 0, 1 or 2"


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
                              "Private to the service user.", _absolute_or_empty)
    keep: int = _setting(2, "Complete checkpoints kept; older ones are removed.", _keep)
    auto: bool = _setting(True, "Take a checkpoint after a cold start when none is stored for "
                                "the worker's current hash.")
    restore: bool = _setting(True, "Restore at start when a checkpoint for the current hash "
                                   "is stored.")
    criu: str = _setting("criu", "The CRIU binary (4.2 or newer on kernels from 6.16).")
    criu_libdir: str = _setting("", "CRIU plugin directory (the CUDA plugin on GPUs); empty: "
                                    "CRIU's default.", _absolute_or_empty)
    timeout: float = _setting(600.0, "Seconds a dump or a restore may take; a worker waiting "
                                     "for its checkpoint resumes serving after this long.",
                              _positive)
    sleep_level: int = _setting(1, "Sleep level before a dump (1: weights offloaded and KV "
                                   "freed on GPUs; the CPU engine only pauses).", _sleep_level)
    env_allow: list[str] = _setting(None, "Extra environment names a restored worker refreshes "
                                          "from restore-context.json.", _env_names)


@dataclass(frozen=True)
class LoggingSection:
    level: str = _setting("info", "debug, info, warning or error.", _log_level)


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
    "logging": LoggingSection,
}

# Engine arguments the agent sets itself from other sections.
_ENGINE_KEYS_OWNED = {
    "model": "model.path",
    "served_model_name": "model.served_name",
    "host": "workers.host",
    "port": "workers.base_port",
}
_ENGINE_KEY = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True)
class Config:
    model: ModelSection
    workers: WorkersSection
    health: HealthSection
    watchdog: WatchdogSection
    metrics: MetricsSection
    discovery: DiscoverySection
    sleep: SleepSection
    lora: LoraSection
    checkpoint: CheckpointSection
    logging: LoggingSection
    engine: dict[str, Any]
    """vLLM engine arguments, passed through as `--key value` (vLLM validates them)."""
    source: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def served_name(self) -> str:
        return self.model.served_name or Path(self.model.path).name or "model"

    @property
    def health_payload(self) -> HealthPayload:
        return parse_payload(self.health.payload)

    @property
    def min_ready(self) -> int:
        return self.workers.min_ready or self.workers.count

    @property
    def metric_labels(self) -> dict[str, str]:
        return dict(self.metrics.labels or {})

    def worker_port(self, index: int) -> int:
        return self.workers.base_port + index

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration as TOML-ready data (no None values)."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            out[name] = {f.name: getattr(section, f.name) for f in fields(section)
                         if getattr(section, f.name) is not None}
        out["engine"] = dict(self.engine)
        return out


def _type_name(annotation: str) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false",
            "str": "a string", "list[int]": "a list of integers ≥ 0",
            "list[str]": "a list of strings"}.get(annotation, "a table")


def _check_type(annotation: str, value: Any) -> bool:
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return (isinstance(value, int | float) and not isinstance(value, bool)
                and math.isfinite(value))
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "str":
        return isinstance(value, str)
    if annotation == "list[int]":
        return isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    if annotation == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, dict)


def _unknown_key(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key}: unknown key{hint}"


def _build_section(name: str, cls: type, raw: Any, errors: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{name}: must be a table, got {type(raw).__name__}")
        return cls()
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        spec = known.get(key)
        if spec is None:
            errors.append(_unknown_key(f"{name}.{key}", list(known)))
            continue
        annotation = str(spec.type).split(" |")[0]
        if not _check_type(annotation, value):
            errors.append(f"{name}.{key}: must be {_type_name(annotation)}, got {value!r}")
            continue
        if annotation == "float":
            value = float(value)
        check = spec.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            errors.append(f"{name}.{key}: {problem}, got {value!r}")
            continue
        values[key] = value
    return cls(**values)


def _check_engine(raw: Any, errors: list[str]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.append(f"engine: must be a table of vLLM engine arguments, got {type(raw).__name__}")
        return {}
    engine: dict[str, Any] = {}
    for key, value in raw.items():
        normalised = key.replace("-", "_")
        if normalised in _ENGINE_KEYS_OWNED:
            errors.append(f"engine.{key}: set by the agent; use {_ENGINE_KEYS_OWNED[normalised]}")
            continue
        if not _ENGINE_KEY.match(key):
            errors.append(f"engine.{key}: not a vLLM argument name (lower case, _ or -)")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"engine.{key}: must be a finite number")
            continue
        engine[normalised] = value
    return engine


def _validate_cross(config: Config, errors: list[str], check_paths: bool) -> None:
    if not config.model.path:
        errors.append("model.path: required (the directory of the model to serve)")
    elif check_paths:
        path = Path(config.model.path)
        if not path.is_dir():
            errors.append(f"model.path: {path} is not a directory")
        elif not (path / "config.json").is_file():
            errors.append(f"model.path: {path} has no config.json (not a Hugging Face model dir)")
    if config.workers.min_ready > config.workers.count:
        errors.append(f"workers.min_ready: {config.workers.min_ready} is more than "
                      f"workers.count ({config.workers.count})")
    if config.workers.restart_backoff > config.workers.restart_backoff_max:
        errors.append("workers.restart_backoff: more than workers.restart_backoff_max")
    worker_ports = range(config.workers.base_port,
                         config.workers.base_port + config.workers.count)
    if config.metrics.port in worker_ports:
        errors.append(f"metrics.port: {config.metrics.port} is also a worker port "
                      f"(workers.base_port + index)")
    last_port = config.workers.base_port + config.workers.count - 1
    if last_port > 65535:
        errors.append(f"workers.base_port: workers up to {config.workers.count - 1} would need "
                      f"port {last_port}")
    if check_paths and config.workers.control_token_file:
        from .auth import TokenError, load_token

        try:
            load_token(config.workers.control_token_file)
        except TokenError as exc:
            errors.append(f"workers.control_token_file: {exc}")
    if config.health.payload is not None:
        try:
            parse_payload(config.health.payload)
        except PayloadError as exc:
            errors.append(str(exc))


def _env_seconds(environ: Mapping[str, str], name: str, current: float,
                 warnings: list[str]) -> float:
    """Dynamo's rule: invalid or non-finite warns and keeps the setting; negative clamps to 0."""
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return current
    try:
        value = float(raw)
    except ValueError:
        warnings.append(f"{name}={raw!r} is not a number; keeping {current:g}")
        return current
    if not math.isfinite(value):
        warnings.append(f"{name}={raw!r} is not finite; keeping {current:g}")
        return current
    if value < 0:
        warnings.append(f"{name}={raw!r} is negative; using 0 (disabled)")
        return 0.0
    return value


def apply_env(config: Config, environ: Mapping[str, str]) -> Config:
    """Apply the `DYN_*` overrides that Dynamo's workers honour."""
    warnings = list(config.warnings)
    health = config.health
    interval = _env_seconds(environ, Env.HEALTH_CHECK_INTERVAL, health.interval, warnings)
    check_timeout = _env_seconds(environ, Env.HEALTH_CHECK_TIMEOUT, health.check_timeout, warnings)
    shutdown = _env_seconds(environ, Env.HEALTH_SHUTDOWN_TIMEOUT, health.shutdown_timeout, warnings)
    canary_idle = _env_seconds(environ, Env.CANARY_WAIT_TIME, health.canary_idle, warnings)
    canary_timeout = _env_seconds(environ, Env.CANARY_REQUEST_TIMEOUT, health.canary_timeout,
                                  warnings)
    # The canary settings must stay positive: 0 there would mean "probe constantly".
    if canary_idle <= 0:
        canary_idle = health.canary_idle
    if canary_timeout <= 0:
        canary_timeout = health.canary_timeout
    payload = health.payload
    raw_payload = environ.get(Env.HEALTH_CHECK_PAYLOAD)
    if raw_payload:
        try:
            payload = parse_payload_env(raw_payload, Env.HEALTH_CHECK_PAYLOAD).to_dict()
        except PayloadError as exc:
            warnings.append(f"{exc}; keeping the configured payload")
    health = replace(health, interval=interval, check_timeout=check_timeout,
                     shutdown_timeout=shutdown, canary_idle=canary_idle,
                     canary_timeout=canary_timeout, payload=payload)
    discovery = config.discovery
    raw_etcd = environ.get(Env.ETCD_ENDPOINTS)
    if raw_etcd and raw_etcd.strip():
        urls = [u.strip() for u in raw_etcd.split(",") if u.strip()]
        problem = _etcd_endpoints(urls)
        if problem:
            warnings.append(f"{Env.ETCD_ENDPOINTS}={raw_etcd!r}: {problem}; keeping "
                            f"{', '.join(discovery.etcd_urls)}")
        else:
            discovery = replace(discovery, etcd_endpoints=urls)
    if config.workers.control_from_network and not config.workers.control_token_file:
        open_routes = ("workers.control_from_network is on without workers.control_token_file: "
                       "anyone who reaches the ports can sleep workers, load adapters and take "
                       "checkpoints")
        if open_routes not in warnings:
            warnings.append(open_routes)
    return replace(config, health=health, discovery=discovery, warnings=tuple(warnings))


def from_dict(raw: Mapping[str, Any], source: str = "", check_paths: bool = True) -> Config:
    """Validate parsed TOML; raise ConfigError listing every problem."""
    errors: list[str] = []
    for key in raw:
        if key not in SECTIONS and key != "engine":
            errors.append(_unknown_key(key, [*SECTIONS, "engine"]))
    sections = {name: _build_section(name, cls, raw.get(name), errors)
                for name, cls in SECTIONS.items()}
    engine = _check_engine(raw.get("engine"), errors)
    config = Config(engine=engine, source=source, **sections)
    _validate_cross(config, errors, check_paths)
    if errors:
        raise ConfigError(errors)
    return config


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None,
         check_paths: bool = True) -> Config:
    """Read, validate and apply environment overrides; raise ConfigError on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such config file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    config = from_dict(raw, source=str(path), check_paths=check_paths)
    return apply_env(config, os.environ if environ is None else environ)


def engine_cli_args(engine: Mapping[str, Any]) -> list[str]:
    """Turn the [engine] table into vLLM command-line arguments (its parser validates them)."""
    args: list[str] = []
    for key, value in engine.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            args.append(flag)
            args.extend(str(v) for v in value)
        elif isinstance(value, dict):
            args.extend([flag, json.dumps(value)])
        else:
            args.extend([flag, str(value)])
    return args
