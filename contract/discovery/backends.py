"""One factory for the discovery backends: `backend_for(config, instance)` gives the object
that both wings use, whatever `discovery.backend` says.

The worker publishes itself through it (`publisher`); the supervisor lists an instance's
records (`records`), deletes a dead worker's record (`delete`), publishes its own scrape
target and lists the fleet's (`target_publisher`, `fleet_targets`). Each backend answers
all of these; the callers never switch on the backend's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynamo_vllm.contract.config import Config
from dynamo_vllm.contract.discovery import Discovery, NoDiscovery, Publishable
from dynamo_vllm.contract.discovery.etcd import (
    EtcdDiscovery,
    delete_record,
    instance_prefix,
    list_records,
    list_target_groups,
    record_key,
    target_key,
)
from dynamo_vllm.contract.discovery.etcd_gateway import EtcdError, EtcdGateway
from dynamo_vllm.contract.discovery.file import FileDiscovery, read_records, record_path

log = logging.getLogger(__name__)

# Bounds every call a supervisor makes to a remote backend, so a dead etcd never blocks it.
CALL_TIMEOUT_S = 5.0


class Backend(enum.StrEnum):
    FILE = "file"
    ETCD = "etcd"
    NONE = "none"


class DiscoveryUnavailable(Exception):
    """The backend cannot be reached (etcd down): the caller reports it, nothing is lost."""


def _ignore_error(operation: str) -> None:
    return None


class NoBackend:
    """`discovery.backend = "none"`, or a file backend with no directory: nothing published."""

    name = Backend.NONE
    directory: Path | None = None

    def __init__(self, config: Config, instance: str):
        self.config = config
        self.instance = instance

    @property
    def where(self) -> str | None:
        return None

    def publisher(self, worker: int,
                  on_error: Callable[[str], None] = _ignore_error) -> Discovery:
        return NoDiscovery()

    async def records(self) -> list[dict[str, Any]]:
        return []

    async def delete(self, worker: int) -> None:
        return None

    def target_publisher(self) -> EtcdDiscovery | None:
        """A publisher of this instance's scrape target for fleet SD, where there is one."""
        return None

    async def fleet_targets(self) -> list[dict[str, Any]] | None:
        """Every instance's scrape target group; None: this backend has no fleet view."""
        return None


class FileBackend(NoBackend):
    """One JSON document per worker in a directory (default: <runtime dir>/endpoints)."""

    name = Backend.FILE

    def __init__(self, config: Config, instance: str, directory: Path):
        super().__init__(config, instance)
        self.directory = directory

    @property
    def where(self) -> str | None:
        return str(self.directory)

    def publisher(self, worker: int,
                  on_error: Callable[[str], None] = _ignore_error) -> Discovery:
        assert self.directory is not None
        return FileDiscovery(self.directory, self.instance, worker)

    async def records(self) -> list[dict[str, Any]]:
        assert self.directory is not None
        # Off the loop: it reads files, and the supervisor's loop pings the watchdog.
        return await asyncio.to_thread(read_records, self.directory)

    async def delete(self, worker: int) -> None:
        assert self.directory is not None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(record_path(self.directory, self.instance, worker))


class EtcdBackend(NoBackend):
    """Keys under a lease in etcd (its v3 JSON gateway); a fleet sees every node."""

    name = Backend.ETCD

    @property
    def where(self) -> str | None:
        urls = ", ".join(self.config.discovery.etcd_urls)
        return f"{urls} {instance_prefix(self.config, self.instance)}"

    def publisher(self, worker: int,
                  on_error: Callable[[str], None] = _ignore_error) -> Discovery:
        settings = self.config.discovery
        return EtcdDiscovery(EtcdGateway.for_settings(settings),
                             record_key(self.config, self.instance, worker),
                             settings.lease_ttl, on_error=on_error)

    async def records(self) -> list[dict[str, Any]]:
        return await _bounded(list_records(self.config, self.instance))

    async def delete(self, worker: int) -> None:
        await _bounded(delete_record(self.config, self.instance, worker))

    def target_publisher(self) -> EtcdDiscovery | None:
        settings = self.config.discovery
        return EtcdDiscovery(EtcdGateway.for_settings(settings),
                             target_key(self.config, self.instance), settings.lease_ttl)

    async def fleet_targets(self) -> list[dict[str, Any]] | None:
        return await _bounded(list_target_groups(self.config))


async def _bounded(call: Any) -> Any:
    try:
        return await asyncio.wait_for(call, CALL_TIMEOUT_S)
    except (EtcdError, TimeoutError) as exc:
        raise DiscoveryUnavailable(f"etcd: {exc or 'timed out'}") from exc


DiscoveryBackend = NoBackend | FileBackend | EtcdBackend


def backend_for(config: Config, instance: str,
                directory: Path | str | None = None) -> DiscoveryBackend:
    """The configured backend for `instance`. The file backend's directory is
    `discovery.path`, else `directory` (the supervisor's <runtime dir>/endpoints, or what a
    worker was told in DYNAMO_VLLM_DISCOVERY_DIR); without either nothing is published."""
    settings = config.discovery
    if settings.backend == Backend.ETCD:
        return EtcdBackend(config, instance)
    where = settings.path or (str(directory) if directory else "")
    if settings.backend == Backend.FILE and where:
        return FileBackend(config, instance, Path(where))
    return NoBackend(config, instance)


class Document:
    """A JSON document to publish as it is (a scrape target group)."""

    def __init__(self, data: dict[str, Any]):
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        return self.data


__all__ = ["Backend", "DiscoveryBackend", "DiscoveryUnavailable", "Document", "EtcdBackend",
           "FileBackend", "NoBackend", "Publishable", "backend_for"]
