"""The worker's control routes: sleep, wake, is_sleeping, clear_kv_blocks, LoRA load/unload,
and snapshot (pause for a checkpoint).

They change state, so by default they answer only clients on loopback (the socket's peer),
whatever address the worker listens on (`workers.control_from_network = true` opts in), and
only with the bearer token of `workers.control_token_file`, which a supervisor always sets
(it writes one at start when the operator names none). Every answer is
`{"status": "ok"|"error", "message": ...}`; a bad body is a 400 naming the problem.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from dynamo_vllm.agent.lifecycle import SLEEP_LEVELS, WAKE_TAGS, Reply, SleepController, error, ok
from dynamo_vllm.agent.lora import AdapterRefused, LoraAdapters
from dynamo_vllm.contract.gate import BadRequest, TokenFile, parse_body, refusal
from dynamo_vllm.contract.protocol import Route

log = logging.getLogger(__name__)

ROUTES = {
    Route.ENGINE_SLEEP: "POST",
    Route.ENGINE_WAKE: "POST",
    Route.ENGINE_IS_SLEEPING: "GET",
    Route.ENGINE_CLEAR_KV: "POST",
    Route.ENGINE_SNAPSHOT: "POST",
    Route.LOAD_LORA: "POST",
    Route.UNLOAD_LORA: "POST",
}


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
    def __init__(self, allow_remote: bool, lora: LoraAdapters, token: TokenFile | None = None):
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
        refused = refusal(client, authorization, from_network=self.allow_remote,
                          token=self.token, needs_token=method == "POST")
        if refused is not None:
            return error(*refused)
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
