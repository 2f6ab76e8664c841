"""A small asyncio client for etcd v3's JSON gateway (`/v3/...`), over httpx.

Chosen over the gRPC clients (reference/etcd.md): pure Python, no protobuf pinning, and it
recovers on the first request after etcd restarts, where gRPC's reconnect backoff can let a
lease expire. The gateway's habits handled here: keys and values are base64, int64 fields
arrive as strings, fields at their default value are omitted, and watch errors arrive as
lines in the stream, which are raised rather than ignored.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dynamo_vllm.contract.etcd_access import AccessError, EtcdAccess

if TYPE_CHECKING:
    import httpx


class EtcdError(Exception):
    """etcd answered, with an error (or could not be reached: see `unreachable`)."""

    def __init__(self, message: str, code: int | None = None, unreachable: bool = False):
        super().__init__(message)
        self.code = code
        self.unreachable = unreachable


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with `prefix`."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return _b64(bytes(raw))


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # "PUT" or "DELETE"
    key: str
    value: bytes
    revision: int


# gRPC's UNAUTHENTICATED: etcd's answer to a missing, wrong or expired auth token.
UNAUTHENTICATED = 16


class EtcdGateway:
    """One per process; every call tries each endpoint in turn. With `access`: TLS (CA,
    client certificate) and etcd's authentication, whose token is fetched on first use and
    again when etcd says it expired."""

    def __init__(self, endpoints: list[str], timeout: float = 3.0,
                 access: EtcdAccess | None = None):
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self.access = access or EtcdAccess()
        # httpx (and what it pulls in) costs the supervisor megabytes of RSS: imported here,
        # only by a process that talks to etcd.
        import httpx

        tls = self.access.ssl_context() if self.access.ca_file or self.access.cert_file \
            else True
        self._client = httpx.AsyncClient(timeout=timeout, verify=tls)
        self._auth_token: str | None = None

    @classmethod
    def for_settings(cls, discovery: Any, timeout: float = 3.0) -> EtcdGateway:
        """From the [discovery] section: its endpoints and access."""
        return cls(discovery.etcd_urls, timeout, EtcdAccess.of(discovery))

    async def close(self) -> None:
        await self._client.aclose()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._auth_token} if self._auth_token else {}

    async def _authenticate(self, endpoint: str) -> None:
        try:
            password = self.access.password()
        except AccessError as exc:
            raise EtcdError(f"discovery.etcd_password_file: {exc}") from None
        resp = await self._client.post(endpoint + "/v3/auth/authenticate",
                                       json={"name": self.access.user, "password": password})
        data = resp.json() if resp.content else {}
        if resp.status_code != 200 or "token" not in data:
            raise EtcdError(f"authenticating as {self.access.user!r}: "
                            f"{data.get('message') or data.get('error') or resp.status_code}",
                            data.get("code"))
        self._auth_token = str(data["token"])

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        last: Exception | None = None
        for endpoint in self.endpoints:
            try:
                if self.access.user and self._auth_token is None:
                    await self._authenticate(endpoint)
                resp = await self._client.post(endpoint + path, json=body,
                                               headers=self._headers())
                if resp.status_code != 200 and self.access.user and \
                        _code(resp) == UNAUTHENTICATED:
                    await self._authenticate(endpoint)  # the token expired: once more
                    resp = await self._client.post(endpoint + path, json=body,
                                                   headers=self._headers())
            except (httpx.HTTPError, OSError) as exc:
                # OSError: a TLS alert (a client certificate refused) that arrives after the
                # handshake, at the first read, is an ssl.SSLError httpx does not wrap.
                last = exc
                continue
            try:
                data = resp.json()
            except ValueError:
                raise EtcdError(f"{path}: HTTP {resp.status_code}: {resp.text[:200]}",
                                resp.status_code) from None
            if resp.status_code != 200:
                raise EtcdError(f"{path}: {data.get('message') or data.get('error') or data}",
                                data.get("code"))
            return dict(data)
        raise EtcdError(f"etcd unreachable at {', '.join(self.endpoints)}: {last}",
                        unreachable=True)

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (id, granted TTL)."""
        data = await self._call("/v3/lease/grant", {"TTL": ttl})
        return int(data["ID"]), int(data.get("TTL", ttl))

    async def keepalive(self, lease: int) -> int:
        """Renew `lease`; its TTL now, 0 when etcd no longer knows it."""
        data = await self._call("/v3/lease/keepalive", {"ID": lease})
        return int(data.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        try:
            await self._call("/v3/lease/revoke", {"ID": lease})
        except EtcdError as exc:
            if exc.code != 5:  # not found: gone already
                raise

    async def put(self, key: str, value: str, lease: int | None = None) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        data = await self._call("/v3/kv/put", body)
        return int(data.get("header", {}).get("revision", 0))

    async def delete(self, key: str) -> int:
        data = await self._call("/v3/kv/deleterange", {"key": _b64(key)})
        return int(data.get("deleted", 0))

    async def get_prefix(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """Every key under `prefix` with its value, and the revision they were read at."""
        data = await self._call("/v3/kv/range", {"key": _b64(prefix),
                                                 "range_end": prefix_end(prefix)})
        kvs = {_unb64(kv["key"]).decode(): _unb64(kv.get("value", ""))
               for kv in data.get("kvs", [])}
        return kvs, int(data.get("header", {}).get("revision", 0))

    async def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchEvent]:
        """Events under `prefix` from `start_revision`; raises EtcdError when the stream
        breaks (the caller re-watches from the last revision + 1)."""
        body: dict[str, Any] = {"create_request": {"key": _b64(prefix),
                                                   "range_end": prefix_end(prefix)}}
        if start_revision:
            body["create_request"]["start_revision"] = start_revision
        import httpx

        # The stream is idle for as long as nothing changes: no read timeout on it.
        timeout = httpx.Timeout(self.timeout, read=None)
        try:
            if self.access.user and self._auth_token is None:
                await self._authenticate(self.endpoints[0])
            async with self._client.stream("POST", self.endpoints[0] + "/v3/watch", json=body,
                                           timeout=timeout, headers=self._headers()) as resp:
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    message = json.loads(line)
                    if "error" in message:
                        raise EtcdError(f"watch: {message['error']}")
                    result = message.get("result", {})
                    if result.get("canceled"):
                        raise EtcdError(f"watch cancelled: {result.get('cancel_reason', '')}")
                    for event in result.get("events", []):
                        kv = event.get("kv", {})
                        yield WatchEvent(event.get("type", "PUT"), _unb64(kv["key"]).decode(),
                                         _unb64(kv.get("value", "")),
                                         int(kv.get("mod_revision", 0)))
        except (httpx.HTTPError, OSError) as exc:
            raise EtcdError(f"watch: {exc}", unreachable=True) from exc


def _code(resp: httpx.Response) -> int | None:
    try:
        return int(resp.json().get("code"))
    except (ValueError, TypeError, AttributeError):
        return None
