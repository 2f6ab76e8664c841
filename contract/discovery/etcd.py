"""The `etcd` discovery backend: one key per worker under a lease kept alive by the worker.

Key layout (documented in docs/worker.md):

    <prefix>/<namespace>/<component>/<endpoint>/<node>/<instance>/<worker>  →  record JSON

A worker that is SIGKILLed stops renewing its lease and etcd deletes its key one TTL later.
When etcd cannot be reached the worker keeps serving: a background task retries with
backoff, logs each failure once per outage, counts it in
`dynamo_component_discovery_errors_total`, and publishes the record again when etcd answers.
A lease etcd no longer knows (TTL 0 on keepalive) is granted again and the key put again.

Unregister deletes the key and revokes the lease. If etcd is down at that moment the lease is
abandoned: nothing renews it, so the key disappears by itself within the TTL of etcd's return.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dynamo_vllm.contract.discovery import Publishable
from dynamo_vllm.contract.discovery.etcd_gateway import EtcdError, EtcdGateway
from dynamo_vllm.contract.discovery.target_groups import valid_groups

if TYPE_CHECKING:
    from dynamo_vllm.contract.config import Config

log = logging.getLogger(__name__)

RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0


def instance_prefix(config: Config, instance: str, node: str | None = None) -> str:
    """Every worker key of one instance on one node starts with this."""
    m = config.metrics
    return "/".join([config.discovery.etcd_prefix.rstrip("/"), m.namespace, m.component,
                     m.endpoint, node or socket.gethostname(), instance]) + "/"


def record_key(config: Config, instance: str, worker: int, node: str | None = None) -> str:
    return instance_prefix(config, instance, node) + str(worker)


def targets_prefix(config: Config) -> str:
    """Where supervisors publish their scrape targets (Prometheus HTTP-SD groups)."""
    return config.discovery.etcd_prefix.rstrip("/") + "-scrape-targets/"


def target_key(config: Config, instance: str) -> str:
    return f"{targets_prefix(config)}{socket.gethostname()}/{instance}"


async def _json_documents(config: Config, prefix: str) -> list[dict[str, Any]]:
    """The JSON objects stored under `prefix`, in key order; others are logged and skipped
    (raises EtcdError)."""
    gateway = EtcdGateway.for_settings(config.discovery)
    try:
        values, _ = await gateway.get_prefix(prefix)
    finally:
        await gateway.close()
    documents = []
    for key, value in sorted(values.items()):
        try:
            document = json.loads(value)
        except ValueError:
            document = None
        if isinstance(document, dict):
            documents.append(document)
        else:
            log.warning("etcd key %s holds no JSON object; skipped", key)
    return documents


async def list_target_groups(config: Config) -> list[dict[str, Any]]:
    """Every supervisor's target group in etcd, the whole fleet, each checked before it is
    republished (raises EtcdError)."""
    return valid_groups(await _json_documents(config, targets_prefix(config)))


async def list_records(config: Config, instance: str) -> list[dict[str, Any]]:
    """The records etcd holds for `instance` on this node (raises EtcdError)."""
    return await _json_documents(config, instance_prefix(config, instance))


async def delete_record(config: Config, instance: str, worker: int) -> None:
    """Remove a dead worker's key now, instead of one lease TTL later (raises EtcdError)."""
    gateway = EtcdGateway.for_settings(config.discovery)
    try:
        await gateway.delete(record_key(config, instance, worker))
    finally:
        await gateway.close()


class EtcdDiscovery:
    def __init__(self, gateway: EtcdGateway, key: str, ttl: int,
                 on_error: Callable[[str], None] = lambda op: None):
        self.gateway = gateway
        self.key = key
        self.ttl = ttl
        self.on_error = on_error
        self.lease: int | None = None
        self.record: Publishable | None = None
        self._lock = asyncio.Lock()
        self._keeper: asyncio.Task[None] | None = None
        self._last_renewed = 0.0
        self._failing = False
        self._published = False

    def _failed(self, op: str, exc: Exception) -> None:
        self.on_error(op)
        if not self._failing:
            log.error("etcd %s failed: %s; the worker keeps serving and retries", op, exc)
        self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            log.info("etcd answers again; record %s published", self.key)
        self._failing = False

    async def _publish(self) -> None:
        async with self._lock:
            if self.record is None:
                return
            if self.lease is None:
                self.lease, granted = await self.gateway.grant(self.ttl)
                self._last_renewed = time.monotonic()
                log.debug("etcd lease %x granted (TTL %d s)", self.lease, granted)
            self._published = False
            try:
                await self.gateway.put(self.key, json.dumps(self.record.to_dict(),
                                                            sort_keys=True), self.lease)
            except EtcdError as exc:
                if exc.code == 5:  # the lease expired under us: a new one next time
                    self.lease = None
                raise
            self._published = True

    async def register(self, record: Publishable) -> None:
        """Publish `record` now if etcd answers; otherwise the keeper keeps trying."""
        self.record = record
        try:
            await self._publish()
            self._recovered()
        except EtcdError as exc:
            self._failed("register", exc)
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep(), name="etcd-keepalive")

    async def _keep(self) -> None:
        """Renew the lease every TTL/3; re-grant and re-put when it is lost; retry on errors."""
        delay = RETRY_FIRST_S
        while self.record is not None:
            published = self._published and self.lease is not None
            try:
                if not published:
                    await self._publish()
                else:
                    assert self.lease is not None
                    ttl = await self.gateway.keepalive(self.lease)
                    if ttl <= 0:
                        log.warning("etcd lease %x expired; granting a new one", self.lease)
                        self.lease = None
                        continue
                    self._last_renewed = time.monotonic()
                self._recovered()
                delay = RETRY_FIRST_S
                await asyncio.sleep(max(self.ttl / 3, 0.5))
            except EtcdError as exc:
                self._failed("keepalive" if published else "register", exc)
                if time.monotonic() - self._last_renewed > self.ttl:
                    # No renewal for a whole TTL: the lease is gone; start again when etcd is back.
                    self.lease = None
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, RETRY_MAX_S)

    async def unregister(self) -> None:
        self.record = None
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        lease, self.lease = self.lease, None
        self._published = False
        async with self._lock:
            try:
                await self.gateway.delete(self.key)
                if lease is not None:
                    await self.gateway.revoke(lease)
            except EtcdError as exc:
                self.on_error("unregister")
                log.error("etcd unregister failed: %s; the key expires with its lease within "
                          "%d s of etcd answering again", exc, self.ttl)

    async def close(self) -> None:
        await self.unregister()
        await self.gateway.close()


__all__ = ["EtcdDiscovery", "delete_record", "instance_prefix", "list_records",
           "list_target_groups", "record_key", "target_key", "targets_prefix"]
