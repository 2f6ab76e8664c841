"""Dynamo's own environment variables over the [dynamo] section, as Dynamo's components read
them: a worker and a `python -m dynamo.frontend` started with one environment find each other;
and the checks of [frontend] against the other sections.

A bad value is an error naming the variable (exit 78), not a warning: a worker that guessed
would register where no frontend looks, and serve nobody.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

from dynamo_vllm.contract.etcd_access import EtcdAccess
from dynamo_vllm.contract.protocol import Env
from dynamo_vllm.contract.settings import (
    DiscoverySection,
    DynamoSection,
    FrontendSection,
    MetricsSection,
)

# Environment variable -> the [dynamo] setting it overrides.
_OVERRIDES = {
    Env.DYN_DISCOVERY_BACKEND: "discovery_backend",
    Env.DYN_FILE_KV: "file_kv",
    Env.DYN_REQUEST_PLANE: "request_plane",
    Env.DYN_EVENT_PLANE: "event_plane",
}


def _check(name: str, value: str) -> str | None:
    for f in fields(DynamoSection):
        if f.name == name and f.metadata.get("check") is not None:
            problem: str | None = f.metadata["check"](value)
            return problem
    return None


def dynamo_overrides(dynamo: DynamoSection, metrics: MetricsSection,
                     environ: Mapping[str, str]
                     ) -> tuple[DynamoSection, MetricsSection, list[str]]:
    """The sections with the environment applied, and every problem as `NAME=value: why`."""
    problems: list[str] = []
    changes: dict[str, Any] = {}
    for variable, key in _OVERRIDES.items():
        raw = environ.get(variable, "").strip()
        if not raw:
            continue
        problem = _check(key, raw)
        if problem:
            problems.append(f"{variable}={raw!r} (overrides dynamo.{key}): {problem}")
        else:
            changes[key] = raw
    namespace = environ.get(Env.DYN_NAMESPACE, "").strip()
    if namespace:
        # One name for the runtime and the dynamo_namespace label.
        if not namespace.replace("-", "_").replace("_", "a").isalnum():
            problems.append(f"{Env.DYN_NAMESPACE}={namespace!r} (overrides metrics.namespace): "
                            "letters, digits, '-' and '_' only")
        else:
            metrics = replace(metrics, namespace=namespace)
    return replace(dynamo, **changes), metrics, problems


def runtime_environment(dynamo: DynamoSection, discovery: DiscoverySection) -> dict[str, str]:
    """What Dynamo's runtime reads from the environment (it has no arguments for these)."""
    # Dynamo binds these to the machine's address unless told otherwise.
    env: dict[str, str] = {"DYN_TCP_RPC_HOST": dynamo.host, "DYN_EVENT_PLANE_HOST": dynamo.host,
                           # The card goes to discovery; no system port serves it here.
                           "DYN_SELF_HOST_METADATA": "0"}
    if dynamo.discovery_backend == "file" and dynamo.file_kv:
        env[Env.DYN_FILE_KV] = dynamo.file_kv
    if dynamo.discovery_backend == "etcd":
        env[Env.ETCD_ENDPOINTS] = ",".join(discovery.etcd_urls)
        env.update(EtcdAccess.of(discovery).dynamo_environment())
    return env


def default_file_kv() -> str:
    """Dynamo's own default for the file backend's directory."""
    return os.path.join(os.environ.get("TMPDIR", "/tmp"), "dynamo_store_kv")


def frontend_problems(frontend: FrontendSection, dynamo: DynamoSection,
                      taken_ports: dict[int, str]) -> list[str]:
    """What is wrong with an enabled [frontend] (cross-section checks)."""
    if not frontend.enabled:
        return []
    problems = []
    if not dynamo.enabled:
        problems.append("frontend.enabled: needs dynamo.enabled (the frontend finds the "
                        "workers through Dynamo's runtime)")
    if frontend.port in taken_ports:
        problems.append(f"frontend.port: {frontend.port} is also {taken_ports[frontend.port]}")
    return problems
