"""The worker's control routes: sleep, wake, is_sleeping, clear_kv_blocks, LoRA load/unload,
and snapshot (pause for a checkpoint).

They change state, so by default they answer only clients on loopback, whatever address the
worker listens on (`workers.control_from_network = true` opts in). Every answer is
`{"status": "ok"|"error", "message": ...}`; a bad body is a 400 naming the problem.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Callable
from typing import Any

from .auth import authorized
from .lifecycle import SLEEP_LEVELS, WAKE_TAGS, Reply, SleepController, error, ok
from .lora import AdapterRefused, LoraAdapters
from .protocol import Route

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
ROUTES = {
    Route.ENGINE_SLEEP: "POST",
    Route.ENGINE_WAKE: "POST",
    Route.ENGINE_IS_SLEEPING: "GET",
    Route.ENGINE_CLEAR_KV: "POST",
    Route.ENGINE_SNAPSHOT: "POST",
    Route.LOAD_LORA: "POST",
    Route.UNLOAD_LORA: "POST",
}


class BadRequest(Exception):
    pass


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def sleep_level(body: dict[str, Any]) -> int:
    _only(body, {"level"})
    level = body.get("level", 1)
    if isinstance(level, bool) or not isinstance(level, int) or level not in SLEEP_LEVELS:
        raise BadRequest(f"level must be 0, 1 or 2, got {level!r}")
    return level


def wake_tags(body: dict[str, Any]) -> list[str] | None:
    _only(body, {"tags"})
    tags = body.get("tags")
    if tags is None:
        return None
    if not isinstance(tags, list) or not tags or not all(t in WAKE_TAGS for t in tags):
        raise BadRequest(f"tags must be a non-empty list of {', '.join(WAKE_TAGS)}, "
                         f"got {tags!r}")
    return list(dict.fromkeys(tags))


class ControlRoutes:
    def __init__(self, allow_remote: bool, lora: LoraAdapters, token: str | None = None):
        self.allow_remote = allow_remote
        self.token = token
        self.controller: SleepController | None = None
        self.engine: Any = None
        self.lora = lora
        # Set when the worker may be checkpointed while serving (a control directory).
        self.snapshot: Callable[[], Reply] | None = None

    async def handle(self, method: str, path: str, raw: bytes, client: str | None,
                     authorization: str | None = None) -> Reply:
        if ROUTES[path] != method:
            return error(405, f"{path} takes {ROUTES[path]}")
        if not self.allow_remote and not is_loopback(client):
            return error(403, "control routes answer loopback clients only "
                              "(workers.control_from_network)")
        if method == "POST" and not authorized(authorization, self.token):
            return error(401, "this route needs the bearer token of "
                              "workers.control_token_file (Authorization: Bearer ...)")
        if self.controller is None:
            return error(503, "the engine is not serving yet")
        try:
            body = parse_body(raw)
            if path == Route.ENGINE_SLEEP:
                return await self.controller.sleep(sleep_level(body))
            if path == Route.ENGINE_WAKE:
                return await self.controller.wake(wake_tags(body))
            if path == Route.ENGINE_IS_SLEEPING:
                return ok("asleep" if self.controller.sleeping else "awake",
                          **self.controller.describe())
            if path in (Route.LOAD_LORA, Route.UNLOAD_LORA):
                return await self._lora(path, body)
            if path == Route.ENGINE_SNAPSHOT:
                _only(body, set())
                if self.snapshot is None:
                    return error(409, "checkpoints are off for this worker (no control "
                                      "directory; checkpoint.enabled)")
                return self.snapshot()
            _only(body, set())
            return await self._clear_kv()
        except BadRequest as exc:
            return error(400, str(exc))
        except AdapterRefused as exc:
            return error(exc.code, str(exc))

    async def _lora(self, path: str, body: dict[str, Any]) -> Reply:
        assert self.controller is not None
        # Under the sleep lock: an adapter never changes while the worker goes to sleep.
        async with self.controller.lock:
            if self.controller.sleeping or not self.controller.status.serving:
                return error(409, f"adapters change only while serving; the worker is "
                                  f"{self.controller.status.state.value}")
            if path == Route.LOAD_LORA:
                return await self.lora.load(body)
            return await self.lora.unload(body)

    async def _clear_kv(self) -> Reply:
        if await self.engine.reset_prefix_cache():
            return ok("prefix cache reset")
        return error(409, "the prefix cache could not be reset while requests run; try again")
