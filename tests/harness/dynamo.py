"""Dynamo's own frontend (`python -m dynamo.frontend`, from the installed ai-dynamo) on
loopback, and what Dynamo's file discovery holds."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx

from tests.harness.basics import engine_config, free_port, wait_for
from tests.harness.processes import ProcessTree


def dynamo_env(file_kv: Path | None = None, etcd_url: str | None = None) -> dict[str, str]:
    """The environment a frontend and the workers share: one discovery, loopback planes."""
    env = {"DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1", "DYN_TCP_RPC_HOST": "127.0.0.1",
           "DYN_EVENT_PLANE_HOST": "127.0.0.1", "DYN_SELF_HOST_METADATA": "0"}
    if file_kv is not None:
        env["DYN_FILE_KV"] = str(file_kv)
    if etcd_url is not None:
        env["ETCD_ENDPOINTS"] = etcd_url
    return env


@dataclass
class DynamoNode:
    """A supervisor's config with [dynamo] on, and the loopback ports it was given."""
    config: dict[str, Any]
    metrics_port: int
    base_port: int
    frontend_port: int | None

    @property
    def front(self) -> str:
        return f"http://127.0.0.1:{self.frontend_port}"


def dynamo_node(model: Path, *, file_kv: Path | None = None, etcd_url: str | None = None,
                frontend_router: str | None = None,
                **sections: dict[str, Any]) -> DynamoNode:
    """One node's config for the tiny model in Dynamo's runtime: the node's records in etcd
    at `etcd_url` (if given); Dynamo's discovery under `file_kv` if given (this node's
    workers seen by this node's frontend only), else in the same etcd (seen by every
    frontend of the fleet); its own frontend child when `frontend_router` names a router
    mode."""
    metrics_port, base_port = free_port(), free_port()
    frontend_port = free_port() if frontend_router else None
    discovery: dict[str, Any] = {"backend": "none"}
    if etcd_url is not None:
        discovery = {"backend": "etcd", "etcd_endpoints": [etcd_url]}
    if file_kv is not None:
        dynamo: dict[str, Any] = {"enabled": True, "file_kv": str(file_kv)}
    else:
        assert etcd_url is not None, "Dynamo's discovery needs etcd or a directory"
        dynamo = {"enabled": True, "discovery_backend": "etcd"}
    extra: dict[str, dict[str, Any]] = {"metrics": {"port": metrics_port},
                                        "discovery": discovery, "dynamo": dynamo}
    if frontend_router:
        extra["frontend"] = {"enabled": True, "port": frontend_port,
                             "router_mode": frontend_router}
    for name, values in sections.items():
        extra[name] = {**extra.get(name, {}), **values}
    return DynamoNode(engine_config(model, base_port, **extra), metrics_port, base_port,
                      frontend_port)


class DynamoFrontend(ProcessTree):
    def __init__(self, log_path: Path, router_mode: str, discovery: str = "file",
                 env: dict[str, str] | None = None, extra: list[str] | None = None):
        self.port = free_port()
        super().__init__([sys.executable, "-m", "dynamo.frontend",
                          "--discovery-backend", discovery, "--request-plane", "tcp",
                          "--event-plane", "zmq", "--router-mode", router_mode,
                          "--http-host", "127.0.0.1", "--http-port", str(self.port),
                          *(extra or [])], log_path, env or {})
        self.base = f"http://127.0.0.1:{self.port}"

    def models(self) -> list[str]:
        try:
            data = httpx.get(self.base + "/v1/models", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return []
        return [m["id"] for m in data.get("data", [])]

    def wait_model(self, name: str, timeout: float) -> None:
        def listed() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"frontend exited with {self.proc.returncode}:\n"
                                     f"{self.log()}")
            return name in self.models()
        wait_for(listed, timeout, interval=0.3, what=f"{name} listed by the frontend")


def file_instances(file_kv: Path, endpoint: str = "generate") -> set[str]:
    """Instance ids (hex, as the worker's /health shows them) registered for `endpoint` in
    Dynamo's file discovery."""
    bucket = file_kv / "v1" / "instances"
    if not bucket.is_dir():
        return set()
    found = set()
    for entry in bucket.iterdir():
        parts = unquote(entry.name).split("/")
        if len(parts) == 4 and parts[2] == endpoint:
            found.add(parts[3])
    return found


def vllm_gauge(port: int, name: str) -> float:
    """A vLLM series (e.g. `num_requests_running`) summed over its labels, from a worker's
    own /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^vllm:{name}\{{[^}}]*\}} (\S+)", text, re.M))


def vllm_counter(port: int, name: str) -> float:
    """A vLLM counter (e.g. `request_success`), as `vllm_gauge` reads it."""
    return vllm_gauge(port, f"{name}_total")
