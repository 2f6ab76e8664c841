"""Control-route input checks and the file discovery backend (logic only, no engine)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from dynamo_vllm.agent.control import sleep_level, wake_tags
from dynamo_vllm.contract.discovery import EndpointRecord
from dynamo_vllm.contract.discovery.file import FileDiscovery, read_records
from dynamo_vllm.contract.gate import BadRequest, is_loopback, parse_body


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.1", False), ("192.168.1.2", False), ("::ffff:10.0.0.1", False), (None, False),
    ("not-an-ip", False),
])
def test_is_loopback(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_bodies() -> None:
    assert parse_body(b"") == {} and parse_body(b"null") == {}
    assert sleep_level(parse_body(b'{"level": 2}')) == 2
    assert sleep_level({}) == 1
    assert wake_tags({}) is None
    assert wake_tags({"tags": ["kv_cache", "kv_cache"]}) == ["kv_cache"]
    for raw in (b"{", b"[]", b'"x"'):
        with pytest.raises(BadRequest):
            parse_body(raw)
    for body in ({"level": True}, {"level": 3}, {"level": 1.0}, {"x": 1}):
        with pytest.raises(BadRequest):
            sleep_level(body)
    for body in ({"tags": []}, {"tags": "weights"}, {"tags": ["gpu"]}):
        with pytest.raises(BadRequest):
            wake_tags(body)


def test_file_discovery_is_atomic_and_idempotent(tmp_path: Path) -> None:
    backend = FileDiscovery(tmp_path / "endpoints", "llama", 1)
    record = EndpointRecord(instance="llama", worker=1, host="127.0.0.1", port=8101,
                            model="llama", state="serving", pid=42)
    asyncio.run(backend.register(record))
    asyncio.run(backend.register(record))
    assert json.loads(backend.path.read_text())["port"] == 8101
    assert [p.name for p in (tmp_path / "endpoints").iterdir()] == ["llama-worker1.json"]
    (tmp_path / "endpoints" / "broken.json").write_text("{")
    (tmp_path / "endpoints" / "link.json").symlink_to(backend.path)
    assert [r["worker"] for r in read_records(tmp_path / "endpoints")] == [1]
    asyncio.run(backend.unregister())
    asyncio.run(backend.unregister())
    assert not backend.path.exists()
