"""The supervisor's HTTP server against hostile and ordinary clients: idle connections are
evicted at the cap and closed after the head timeout, a scrape still gets in, a malformed
request is a 4xx, and /metrics is gzipped when asked (a real server on loopback)."""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from dynamo_vllm.contract.gate import TokenFile
from dynamo_vllm.supervisor import http as http_module
from dynamo_vllm.supervisor.http import Request, StatusServer
from tests.harness import closed_by_peer


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[StatusServer]:
    monkeypatch.setattr(http_module, "MAX_CONNECTIONS", 16)
    monkeypatch.setattr(http_module, "HEAD_TIMEOUT_S", 1.5)
    registry = CollectorRegistry()
    counter = Counter("scraped_things", "A series long enough to compress.", ["name"],
                      registry=registry)
    for i in range(200):
        counter.labels(name=f"thing-{i}").inc()
    # The workers' part: the same bytes object from scrape to scrape, as while none changed.
    workers = b"".join(b'vllm:requests_total{worker="%d"} 1.0\n' % i for i in range(300))
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    status = StatusServer("127.0.0.1", 0, lambda: (workers, generate_latest(registry)),
                          lambda: {"ready": True, "status": "ok"}, None, loop)  # type: ignore[arg-type]
    status.start()
    yield status
    status.stop()
    loop.call_soon_threadsafe(loop.stop)
    loop_thread.join(timeout=5)
    loop.close()


def raw(server: StatusServer, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_idle_connections_are_evicted_and_timed_out(server: StatusServer) -> None:
    base = f"http://127.0.0.1:{server.port}"
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(48)]
    try:
        time.sleep(0.3)
        # Past the cap of 16: the oldest idle ones made room, and a scrape still gets in.
        assert httpx.get(base + "/metrics", timeout=5).status_code == 200
        assert sum(closed_by_peer(sock) for sock in idle[:32]) == 32
        assert not any(closed_by_peer(sock) for sock in idle[-8:])
        time.sleep(2.0)  # past the head timeout: the rest are closed too
        assert all(closed_by_peer(sock) for sock in idle)
    finally:
        for sock in idle:
            sock.close()


def test_a_half_sent_request_is_closed_after_the_head_timeout(server: StatusServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert sock.recv(100) == b""
        assert time.monotonic() - started < 4


def test_malformed_requests_get_a_4xx(server: StatusServer) -> None:
    assert raw(server, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.0 400 ")
    assert raw(server, b"GET /status HTTP/1.1\r\nno colon here\r\n\r\n").startswith(
        b"HTTP/1.0 400 ")
    huge = b"GET /status HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
    assert raw(server, huge).startswith(b"HTTP/1.0 431 ")
    assert raw(server, b"DELETE /status HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 405 ")
    assert raw(server, b"POST /checkpoint HTTP/1.1\r\nContent-Length: x\r\n\r\n").startswith(
        b"HTTP/1.0 4")


def test_metrics_are_gzipped_when_asked(server: StatusServer) -> None:
    base = f"http://127.0.0.1:{server.port}"
    plain = httpx.get(base + "/metrics", headers={"Accept-Encoding": "identity"}, timeout=5)
    assert "Content-Encoding" not in plain.headers
    packed = raw(server, b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip\r\n\r\n")
    head, _, body = packed.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head
    assert gzip.decompress(body) == plain.content
    assert len(body) < len(plain.content) / 4
    # The workers' part, unchanged, is not compressed again; a client's own gzip reader
    # takes the spliced stream.
    again = httpx.get(base + "/metrics", timeout=5)
    assert again.headers["Content-Encoding"] == "gzip" and again.content == plain.content
    assert server.gzip.deflated_kept == 1


def test_an_ipv6_wildcard_listener_answers_on_both_families() -> None:
    loop = asyncio.new_event_loop()
    status = StatusServer("::", 0, lambda: (generate_latest(CollectorRegistry()),),
                          lambda: {"ready": True}, None, loop)  # type: ignore[arg-type]
    status.start()
    try:
        for host in ("127.0.0.1", "[::1]"):
            answer = httpx.get(f"http://{host}:{status.port}/healthz", timeout=5)
            assert answer.status_code == 200, host
    finally:
        status.stop()
        loop.close()


def test_status_and_endpoints_need_the_token_from_the_network(tmp_path: Path) -> None:
    """From a peer off loopback (metrics.host opened), /status and /endpoints need the
    token; /metrics, /healthz and /sd stay open to Prometheus. (The peer is handed in: the
    tests never listen beyond loopback.)"""
    token = tmp_path / "token"
    token.write_text("a-token-of-sixteen-chars\n")
    token.chmod(0o600)
    loop = asyncio.new_event_loop()
    status = StatusServer("127.0.0.1", 0, lambda: (generate_latest(CollectorRegistry()),),
                          lambda: {"ready": True}, None, loop, token=TokenFile(str(token)))  # type: ignore[arg-type]

    def code(path: str, peer: str, auth: str = "") -> int:
        head = f"GET {path} HTTP/1.1\r\n" + (f"Authorization: Bearer {auth}\r\n" if auth else "")
        answer = asyncio.run(status._answer(Request((head + "\r\n").encode()), b"", peer))
        return answer[0]

    try:
        assert code("/status", "192.0.2.9") == 401
        assert code("/endpoints", "192.0.2.9") == 401
        assert code("/status", "192.0.2.9", "a-token-of-sixteen-chars") == 200
        assert code("/status", "127.0.0.1") == 200
        assert code("/healthz", "192.0.2.9") == 200
        assert code("/metrics", "192.0.2.9") == 200
    finally:
        status.stop()
        loop.close()
