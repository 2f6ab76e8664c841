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
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from dynamo_vllm.contract.dynamo_env import dynamo_overrides, frontend_problems
from dynamo_vllm.contract.etcd_access import EtcdAccess
from dynamo_vllm.contract.payload import (
    HealthPayload,
    PayloadError,
    parse_payload,
    parse_payload_env,
)
from dynamo_vllm.contract.protocol import Env
from dynamo_vllm.contract.secrets import exposed_secrets
from dynamo_vllm.contract.settings import (
    DEFAULT_ETCD_ENDPOINT,
    SECTIONS,
    CheckpointSection,
    DiscoverySection,
    DynamoSection,
    FrontendSection,
    HealthSection,
    LoggingSection,
    LoraSection,
    MetricsSection,
    ModelSection,
    Scope,
    SleepSection,
    WatchdogSection,
    WorkersSection,
    etcd_endpoints_problem,
    scope_of,
)

__all__ = [
    "DEFAULT_ETCD_ENDPOINT", "SECTIONS", "CheckpointSection", "Config", "ConfigError",
    "DiscoverySection", "DynamoSection", "HealthSection", "LoggingSection", "LoraSection",
    "MetricsSection", "ModelSection", "Scope", "SleepSection", "WatchdogSection",
    "WorkersSection", "apply_env", "engine_cli_args", "from_dict", "load", "scope_of",
    "worker_view",
]


class ConfigError(Exception):
    """One or more configuration errors, each as `key: problem`."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


# Engine arguments the agent sets itself from other sections.
_ENGINE_KEYS_OWNED = {
    "model": "model.path",
    "served_model_name": "model.served_name",
    "host": "workers.host",
    "port": "workers.base_port",
}
# vLLM server arguments the worker's own HTTP front does not honour: refused, never dropped
# (a TLS setting that passed and then served plaintext was a finding of the security review).
_TLS = ("the worker serves plain HTTP; terminate TLS at Dynamo's frontend "
        "([frontend.args] tls_cert_path, tls_key_path) or a proxy in front")
_ENGINE_KEYS_REFUSED = {key: _TLS for key in (
    "ssl_keyfile", "ssl_certfile", "ssl_ca_certs", "ssl_cert_reqs", "ssl_ciphers",
    "enable_ssl_refresh")}
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
    dynamo: DynamoSection
    frontend: FrontendSection
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


def worker_view(config: Config) -> dict[str, Any]:
    """The settings a running worker depends on (scope WORKER) and its engine arguments: a
    change of any of them rolls the workers, and they are what a checkpoint's hash covers."""
    data = config.to_dict()
    view: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        view[name] = {key: value for key, value in data[name].items()
                      if scope_of(cls, key) is Scope.WORKER}
    view["engine"] = data["engine"]
    return {name: keys for name, keys in view.items() if keys or name == "engine"}


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
        if normalised in _ENGINE_KEYS_REFUSED:
            errors.append(f"engine.{key}: not supported: {_ENGINE_KEYS_REFUSED[normalised]}")
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
        try:
            if not path.is_dir():
                errors.append(f"model.path: {path} is not a directory")
            elif not (path / "config.json").is_file():
                errors.append(f"model.path: {path} has no config.json (not a Hugging Face "
                              "model dir)")
        except OSError as exc:  # is_dir raises for EACCES: another user, a private parent
            errors.append(f"model.path: cannot read {path}: {exc.strerror or exc}")
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
        from dynamo_vllm.contract.gate import TokenError, load_token

        try:
            load_token(config.workers.control_token_file)
        except TokenError as exc:
            errors.append(f"workers.control_token_file: {exc}")
    errors.extend(EtcdAccess.of(config.discovery).problems(check_paths))
    ports = {config.metrics.port: "metrics.port",
             **{config.worker_port(i): f"worker {i}'s port" for i in range(config.workers.count)}}
    errors.extend(frontend_problems(config.frontend, config.dynamo, ports))
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
        problem = etcd_endpoints_problem(urls)
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
    dynamo, metrics, problems = dynamo_overrides(config.dynamo, config.metrics, environ)
    if problems:
        raise ConfigError(problems)
    return replace(config, health=health, discovery=discovery, dynamo=dynamo, metrics=metrics,
                   warnings=tuple(warnings))


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
    exposed = exposed_secrets(config.engine, path)
    if exposed:
        config = replace(config, warnings=(*config.warnings, exposed))
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
