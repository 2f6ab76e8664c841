"""The etcd backend's retry logic against a scripted gateway (the real etcd is in the
integration tests): etcd down at register and at unregister, and a lease that lapses."""

from __future__ import annotations

import asyncio
from typing import Any

from dynamo_vllm.contract.discovery import EndpointRecord
from dynamo_vllm.contract.discovery import etcd as backend
from dynamo_vllm.contract.discovery.etcd_gateway import EtcdError


class ScriptedGateway:
    def __init__(self) -> None:
        self.up = True
        self.leases: dict[int, int] = {}
        self.keys: dict[str, tuple[str, int | None]] = {}
        self.next_lease = 100

    def _check(self) -> None:
        if not self.up:
            raise EtcdError("etcd unreachable", unreachable=True)

    async def grant(self, ttl: int) -> tuple[int, int]:
        self._check()
        self.next_lease += 1
        self.leases[self.next_lease] = ttl
        return self.next_lease, ttl

    async def keepalive(self, lease: int) -> int:
        self._check()
        return self.leases.get(lease, 0)

    async def put(self, key: str, value: str, lease: int | None = None) -> int:
        self._check()
        if lease is not None and lease not in self.leases:
            raise EtcdError("requested lease not found", code=5)
        self.keys[key] = (value, lease)
        return 1

    async def delete(self, key: str) -> int:
        self._check()
        return 1 if self.keys.pop(key, None) else 0

    async def revoke(self, lease: int) -> None:
        self._check()
        self.leases.pop(lease, None)
        self.keys = {k: v for k, v in self.keys.items() if v[1] != lease}

    async def close(self) -> None:
        return None


def record() -> EndpointRecord:
    return EndpointRecord(instance="i", worker=0, host="127.0.0.1", port=1, model="m",
                          state="serving", pid=1)


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_etcd_down_at_register_is_retried_and_counted(monkeypatch: Any) -> None:
    monkeypatch.setattr(backend, "RETRY_FIRST_S", 0.05)
    errors: list[str] = []

    async def scenario() -> None:
        gateway = ScriptedGateway()
        gateway.up = False
        discovery = backend.EtcdDiscovery(gateway, "k", 3, on_error=errors.append)  # type: ignore[arg-type]
        await discovery.register(record())  # does not raise: the worker keeps serving
        assert "k" not in gateway.keys and errors == ["register"]
        await asyncio.sleep(0.2)
        gateway.up = True
        await until(lambda: "k" in gateway.keys)
        await discovery.unregister()
        assert gateway.keys == {} and gateway.leases == {}

    asyncio.run(scenario())
    assert errors.count("register") >= 2


def test_a_lapsed_lease_is_granted_again(monkeypatch: Any) -> None:
    async def scenario() -> None:
        gateway = ScriptedGateway()
        discovery = backend.EtcdDiscovery(gateway, "k", 3)  # type: ignore[arg-type]
        await discovery.register(record())
        first = gateway.keys["k"][1]
        assert first is not None
        await gateway.revoke(first)  # as etcd does when a lease expires
        await until(lambda: "k" in gateway.keys, timeout=4)
        assert gateway.keys["k"][1] not in (None, first)
        await discovery.unregister()

    asyncio.run(scenario())


def test_unregister_with_etcd_down_abandons_the_lease() -> None:
    errors: list[str] = []

    async def scenario() -> None:
        gateway = ScriptedGateway()
        discovery = backend.EtcdDiscovery(gateway, "k", 3, on_error=errors.append)  # type: ignore[arg-type]
        await discovery.register(record())
        gateway.up = False
        await discovery.unregister()  # does not raise
        assert discovery.lease is None and discovery.record is None
        assert discovery._keeper is None  # nothing renews the lease any more
        gateway.up = True
        await asyncio.sleep(0.1)
        assert "k" in gateway.keys  # until etcd expires the abandoned lease

    asyncio.run(scenario())
    assert errors == ["unregister"]


def test_a_tls_alert_after_the_handshake_is_etcd_unreachable() -> None:
    """etcd refusing a missing client certificate answers with a TLS alert at the first read
    under TLS 1.3, a raw ssl.SSLError httpx does not wrap: it must read as etcd unreachable
    (a 503 on /sd), never escape as an unexpected error (a 500; seen in CI)."""
    import ssl

    import httpx
    import pytest

    from dynamo_vllm.contract.discovery.etcd_gateway import EtcdGateway

    def refuse(request: httpx.Request) -> httpx.Response:
        raise ssl.SSLError(1, "[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate")

    async def call() -> None:
        gateway = EtcdGateway(["https://127.0.0.1:1"])
        gateway._client = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
        try:
            await gateway.grant(10)
        finally:
            await gateway.close()

    with pytest.raises(EtcdError, match=r"etcd unreachable.*BAD_CERTIFICATE") as raised:
        asyncio.run(call())
    assert raised.value.unreachable
