"""The bearer token of the state-changing routes: the worker's control routes and the
supervisor's POST /checkpoint and /restore (a real HTTP server on loopback)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from dynamo_vllm.agent.control import ControlRoutes
from dynamo_vllm.agent.lora import LoraAdapters
from dynamo_vllm.contract.gate import TokenError, authorized, load_token
from dynamo_vllm.supervisor.http import StatusServer

TOKEN = "s3cret-token-0123456789"


def token_file(tmp_path: Path, content: str = TOKEN, mode: int = 0o600) -> str:
    path = tmp_path / "token"
    path.write_text(content + "\n")
    os.chmod(path, mode)
    return str(path)


def test_loading_the_token(tmp_path: Path) -> None:
    assert load_token(token_file(tmp_path)) == TOKEN
    for content, mode, problem in ((TOKEN, 0o644, "group or others"),
                                   ("short", 0o600, "at least 16"),
                                   ("has a space in the middle", 0o600, "without spaces")):
        with pytest.raises(TokenError, match=problem):
            load_token(token_file(tmp_path, content, mode))
    with pytest.raises(TokenError, match="cannot read"):
        load_token(str(tmp_path / "missing"))


def test_authorized() -> None:
    assert authorized(None, None)
    assert authorized(f"Bearer {TOKEN}", TOKEN) and authorized(f"bearer {TOKEN}", TOKEN)
    for header in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer "):
        assert not authorized(header, TOKEN)


def test_worker_control_routes_need_the_token() -> None:
    routes = ControlRoutes(allow_remote=False, lora=LoraAdapters([], None), token=TOKEN)

    async def call(authorization: str | None, method: str = "POST",
                   path: str = "/engine/sleep") -> int:
        code, _ = await routes.handle(method, path, b"{}", "127.0.0.1", authorization)
        return code

    assert asyncio.run(call(None)) == 401
    assert asyncio.run(call("Bearer wrong-token-000000000")) == 401
    # Past the token check: no engine yet.
    assert asyncio.run(call(f"Bearer {TOKEN}")) == 503
    assert asyncio.run(call(None, "GET", "/engine/is_sleeping")) == 503  # reading is open


def _post(url: str, token: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=b'{"worker": 0}', headers=headers,
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class RecordingRoutes:
    """The loop-side handlers, recording what reaches them past the gate."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    async def control(self, path: str, body: dict) -> tuple[int, dict]:
        self.calls.append((path, body))
        return 202, {"result": "restoring"}


def test_supervisor_posts_need_the_token() -> None:
    routes = RecordingRoutes()
    calls = routes.calls
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    server = StatusServer("127.0.0.1", 0, CollectorRegistry(), lambda: {},
                          routes, loop, token=TOKEN)  # type: ignore[arg-type]
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert _post(base + "/restore", None)[0] == 401
        assert _post(base + "/restore", "not-the-token-00000000")[0] == 401
        assert calls == []
        assert _post(base + "/restore", TOKEN) == (202, {"result": "restoring"})
        assert calls == [("/restore", {"worker": 0})]
        assert _post(base + "/status", TOKEN)[0] == 405
    finally:
        server.stop()
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(timeout=5)
        loop.close()
