"""LoRA adapters loaded and unloaded at run time, from directories the operator allows.

vLLM's own `/v1/load_lora_adapter` takes any path the engine process can read, and only
exists behind `VLLM_ALLOW_RUNTIME_LORA_UPDATING`, which its log calls development-only. Ours
loads through vLLM's serving layer (so `/v1/models` lists the adapter and requests can name
it as the model), but first resolves the path and every file in it and refuses anything
outside `lora.allowed_roots`, traversal and escaping symlinks included. Unloading also frees
the engine's copy, which vLLM's route leaves cached.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dynamo_vllm.agent.lifecycle import Reply, error, ok

ADAPTER_CONFIG = "adapter_config.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class AdapterRefused(Exception):
    """A request the worker will not carry out: (HTTP code, message)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


MAX_ADAPTER_ENTRIES = 10_000


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_adapter_dir(raw: str, roots: list[str]) -> Path:
    """The adapter directory's real path, when it and every file in it lie under a root."""
    if not roots:
        raise AdapterRefused(403, "loading adapters at run time is off: no lora.allowed_roots "
                                  "in the config")
    if not raw or "\0" in raw:
        raise AdapterRefused(400, "lora_path must be a non-empty path")
    if not os.path.isabs(raw):
        raise AdapterRefused(400, f"lora_path must be absolute, got {raw!r}")
    real_roots = [os.path.realpath(root) for root in roots]
    real = os.path.realpath(raw)
    if not any(_within(real, root) for root in real_roots):
        raise AdapterRefused(403, f"lora_path {raw!r} is outside lora.allowed_roots "
                                  f"({', '.join(roots)})")
    if not os.path.isdir(real):
        raise AdapterRefused(404, f"lora_path {raw!r} is not a directory")
    if not os.path.isfile(os.path.join(real, ADAPTER_CONFIG)):
        raise AdapterRefused(400, f"lora_path {raw!r} has no {ADAPTER_CONFIG} (not a PEFT "
                                  "LoRA adapter)")
    # The engine opens the files in the directory and below: a symlink anywhere in the tree
    # must not lead out either. Bounded, so a huge tree is refused rather than walked.
    seen = 0
    for parent, dirs, files in os.walk(real, followlinks=False):
        for name in (*dirs, *files):
            seen += 1
            if seen > MAX_ADAPTER_ENTRIES:
                raise AdapterRefused(400, f"lora_path {raw!r} holds more than "
                                          f"{MAX_ADAPTER_ENTRIES} entries")
            target = os.path.realpath(os.path.join(parent, name))
            if not any(_within(target, root) for root in real_roots):
                shown = os.path.relpath(os.path.join(parent, name), real)
                raise AdapterRefused(403, f"{shown} in {raw!r} leads outside "
                                          "lora.allowed_roots")
    return Path(real)


def _field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise AdapterRefused(400, f"{name} is required and must be a non-empty string")
    return value


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise AdapterRefused(400, f"unknown field {unknown[0]!r} "
                                  f"(allowed: {', '.join(sorted(allowed))})")


def adapter_name(body: dict[str, Any]) -> str:
    name = _field(body, "lora_name")
    if not _NAME.match(name):
        raise AdapterRefused(400, "lora_name must be 1-128 letters, digits, '.', '_', ':' or "
                                  f"'-', starting with a letter or digit, got {name!r}")
    return name


class LoraAdapters:
    """Load and unload adapters through vLLM's model registry (one at a time)."""

    def __init__(self, allowed_roots: list[str], on_change: Callable[[], Awaitable[None]]):
        self.allowed_roots = list(allowed_roots)
        self.on_change = on_change
        self.models: Any = None  # vLLM's OpenAIServingModels, once the engine serves
        self.engine: Any = None

    @property
    def enabled(self) -> bool:
        return getattr(getattr(self.engine, "vllm_config", None), "lora_config", None) is not None

    def names(self) -> list[str]:
        return sorted(self.requests())

    def requests(self) -> dict[str, Any]:
        """vLLM's LoRARequest of every loaded adapter, by name."""
        return dict(self.models.lora_requests) if self.models is not None else {}

    def _check_enabled(self) -> None:
        if self.models is None:
            raise AdapterRefused(503, "the engine is not serving yet")
        if not self.enabled:
            raise AdapterRefused(409, "LoRA is not enabled in this engine: set "
                                      "engine.enable_lora = true (and engine.max_lora_rank)")

    async def load(self, body: dict[str, Any]) -> Reply:
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        _only(body, {"lora_name", "lora_path", "load_inplace"})
        name = adapter_name(body)
        raw_path = _field(body, "lora_path")
        inplace = body.get("load_inplace", False)
        if not isinstance(inplace, bool):
            raise AdapterRefused(400, f"load_inplace must be true or false, got {inplace!r}")
        self._check_enabled()
        if name in self.models.lora_requests and not inplace:
            raise AdapterRefused(409, f"adapter {name!r} is loaded already (unload it first, "
                                      "or set load_inplace)")
        path = resolve_adapter_dir(raw_path, self.allowed_roots)
        result = await self.models.load_lora_adapter(LoadLoRAAdapterRequest(
            lora_name=name, lora_path=str(path), load_inplace=inplace))
        if not isinstance(result, str):
            # vLLM answers a bad adapter (rank too large, unknown modules) with a 500; it is
            # the adapter that is wrong, not the worker.
            err = result.error
            code = err.code if 400 <= err.code < 500 else 422
            raise AdapterRefused(code, f"the engine refused adapter {name!r}: {err.message}")
        await self.on_change()
        return ok(f"adapter {name!r} loaded", lora_name=name, lora_path=str(path),
                  adapters=self.names())

    async def unload(self, body: dict[str, Any]) -> Reply:
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        _only(body, {"lora_name"})
        name = adapter_name(body)
        self._check_enabled()
        loaded = self.models.lora_requests.get(name)
        if loaded is None:
            raise AdapterRefused(404, f"adapter {name!r} is not loaded")
        result = await self.models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
        if not isinstance(result, str):
            return error(result.error.code, result.error.message)
        await self.engine.remove_lora(loaded.lora_int_id)
        await self.on_change()
        return ok(f"adapter {name!r} unloaded", lora_name=name, adapters=self.names())


__all__ = ["AdapterRefused", "LoraAdapters", "adapter_name", "resolve_adapter_dir"]
