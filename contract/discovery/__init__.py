"""Discovery: where load balancers and tools find the workers that serve.

A worker registers a record when it serves and removes it before it stops serving (sleep,
stop). Backends share one interface; `file` is the default.
"""

from __future__ import annotations

import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

RECORD_VERSION = 1


@dataclass
class EndpointRecord:
    instance: str
    worker: int
    host: str
    port: int
    model: str
    state: str
    pid: int
    lora_adapters: list[str] = field(default_factory=list)
    node: str = field(default_factory=socket.gethostname)
    version: int = RECORD_VERSION
    updated_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Publishable(Protocol):
    """What a backend stores: a JSON-ready document."""

    def to_dict(self) -> dict[str, Any]: ...


class Discovery(Protocol):
    """A backend. Both calls are idempotent."""

    async def register(self, record: EndpointRecord) -> None: ...

    async def unregister(self) -> None: ...


class NoDiscovery:
    """For a worker run by hand with no discovery configured."""

    async def register(self, record: EndpointRecord) -> None:
        return None

    async def unregister(self) -> None:
        return None
