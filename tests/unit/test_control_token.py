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
from prometheus_client import CollectorRegistry, generate_latest

from dynamo_vllm.agent.control import ControlRoutes
from dynamo_vllm.agent.lora import LoraAdapters
from dynamo_vllm.contract.config import Config, from_dict
from dynamo_vllm.contract.gate import TokenError, TokenFile, authorized, load_token, refusal
from dynamo_vllm.supervisor.control_token import (
    TOKEN_NAME,
    with_default_token,
    write_fresh_token,
)
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


def test_a_rotated_token_takes_effect_without_a_restart(tmp_path: Path) -> None:
    """A worker (a restored one included) reads the file again when it changes."""
    source = TokenFile(token_file(tmp_path))
    assert refusal("127.0.0.1", f"Bearer {TOKEN}", from_network=False, token=source) is None
    rotated = "rotated-token-9876543210"
    replacement = tmp_path / "token.new"
    replacement.write_text(rotated + "\n")
    os.chmod(replacement, 0o600)
    os.replace(replacement, tmp_path / "token")
    assert refusal("127.0.0.1", f"Bearer {TOKEN}", from_network=False, token=source)[0] == 401
    assert refusal("127.0.0.1", f"Bearer {rotated}", from_network=False, token=source) is None
    (tmp_path / "token").unlink()
    # A token that cannot be read closes the gate; it never opens it.
    assert refusal("127.0.0.1", f"Bearer {rotated}", from_network=False, token=source)[0] == 503


def test_the_loopback_check_is_the_peer_and_a_header_cannot_pass_it(tmp_path: Path) -> None:
    source = TokenFile(token_file(tmp_path))
    assert refusal("10.1.2.3", f"Bearer {TOKEN}", from_network=False, token=source)[0] == 403
    assert refusal("::ffff:127.0.0.1", f"Bearer {TOKEN}", from_network=False,
                   token=source) is None


def test_the_supervisor_makes_a_private_token_when_none_is_configured(tmp_path: Path) -> None:
    def config(**workers: str) -> Config:
        return from_dict({"model": {"path": str(tmp_path)}, "workers": workers},
                         check_paths=False)

    path = tmp_path / TOKEN_NAME
    assert with_default_token(config(), tmp_path).workers.control_token_file == str(path)
    write_fresh_token(path)
    first = load_token(str(path))
    assert os.stat(path).st_mode & 0o777 == 0o600
    write_fresh_token(path)
    assert load_token(str(path)) != first  # a new one per start
    given = config(control_token_file="/etc/token")
    assert with_default_token(given, tmp_path) is given


def test_worker_control_routes_need_the_token(tmp_path: Path) -> None:
    routes = ControlRoutes(allow_remote=False, lora=LoraAdapters([], None),
                           token=TokenFile(token_file(tmp_path)))

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


def test_supervisor_posts_need_the_token(tmp_path: Path) -> None:
    routes = RecordingRoutes()
    calls = routes.calls
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    server = StatusServer("127.0.0.1", 0, lambda: (generate_latest(CollectorRegistry()),),
                          lambda: {}, routes, loop,  # type: ignore[arg-type]
                          token=TokenFile(token_file(tmp_path)))
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
