"""The supervisor's route handlers that need its loop: /endpoints, /sd and the POST routes
(/checkpoint, /restore). They run on the supervisor's event loop; the HTTP transport
(`supervisor.http`) hands them over with `run_coroutine_threadsafe` and nothing else.

The read-only routes that need no loop (/metrics, /status, /healthz, /openapi.json) are
answered in the transport's thread from the registry and the status snapshot.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import TYPE_CHECKING, Any

from dynamo_vllm.contract.config import Config
from dynamo_vllm.contract.discovery.backends import DiscoveryUnavailable
from dynamo_vllm.contract.protocol import Route

if TYPE_CHECKING:
    from dynamo_vllm.supervisor.daemon import Supervisor


# How long one etcd read of the fleet's targets answers /sd?scope=fleet: a flood of requests
# costs at most one etcd query per interval (Prometheus refreshes every 30 s or more).
FLEET_SD_TTL_S = 5.0


class Unavailable(Exception):
    """What a route needs (etcd) cannot be reached: 503, with the reason."""


def target_group(config: Config, instance: str) -> dict[str, Any]:
    """This instance as a Prometheus HTTP-SD target group (prometheus/http-sd.yml)."""
    metrics = config.metrics
    host = metrics.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    address = f"[{host}]:{metrics.port}" if ":" in host else f"{host}:{metrics.port}"
    return {"targets": [address],
            "labels": {"node": socket.gethostname(), "dynamo_vllm_instance": instance,
                       "__meta_dynamo_vllm_model": config.served_name,
                       "__meta_dynamo_vllm_workers": str(config.workers.count)}}


class Routes:
    """The loop-side handlers, bound to one supervisor."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self._fleet: asyncio.Task[list[dict[str, Any]] | None] | None = None
        self._fleet_at = 0.0

    async def endpoints(self) -> dict[str, Any]:
        """What discovery holds for this instance."""
        discovery = self.supervisor.discovery
        answer: dict[str, Any] = {"backend": self.supervisor.config.discovery.backend,
                                  "path": discovery.where, "endpoints": []}
        try:
            answer["endpoints"] = await discovery.records()
        except DiscoveryUnavailable as exc:
            answer["error"] = str(exc)
        return answer

    async def scrape_targets(self, fleet: bool) -> list[dict[str, Any]]:
        """This instance's target group, or with `fleet` every instance's where the backend
        has a fleet view (etcd)."""
        supervisor = self.supervisor
        if fleet:
            stale = time.monotonic() - self._fleet_at > FLEET_SD_TTL_S
            if self._fleet is None or (self._fleet.done() and stale):
                # One query at a time, shared by every request that arrives meanwhile.
                self._fleet = asyncio.create_task(supervisor.discovery.fleet_targets())
                self._fleet_at = time.monotonic()
            try:
                groups = await asyncio.shield(self._fleet)
            except DiscoveryUnavailable as exc:
                self._fleet_at = 0.0  # a failure is not kept: the next request asks again
                # Prometheus keeps its last good list when SD fails; a 503 says why.
                raise Unavailable(str(exc)) from exc
            if groups is not None:
                return groups
        return [target_group(supervisor.config, supervisor.instance)]

    async def control(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST /checkpoint and /restore."""
        chrek = self.supervisor.chrek
        if chrek is None:
            return 409, {"error": "checkpoints are off (checkpoint.enabled = false)"}
        worker = body.get("worker", 0)
        if isinstance(worker, bool) or not isinstance(worker, int):
            return 400, {"error": f"worker must be a worker index, got {worker!r}"}
        if set(body) - {"worker"}:
            return 400, {"error": f"unknown field {sorted(set(body) - {'worker'})[0]!r} "
                                  "(allowed: worker)"}
        if path == Route.CHECKPOINT:
            return await chrek.request_checkpoint(str(worker))
        return chrek.request_restore(str(worker))
