"""The health-check (canary) payload: what the worker sends to its own engine to prove it answers.

Follows Dynamo's `health_check.py`: token mode (`[BOS]`, the default) or text mode (a
prompt), one token, temperature 0. Accepts the flat form (`{"prompt": "Test"}`,
`{"token_ids": [1], "max_tokens": 1}`) and Dynamo's nested form
(`{"token_ids": [1], "stop_conditions": {"max_tokens": 1},
"sampling_options": {"temperature": 0}}`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Dynamo's fallback when the tokenizer has no BOS token.
DEFAULT_BOS_TOKEN_ID = 1
DEFAULT_TEXT_PROMPT = "Test"


class PayloadError(ValueError):
    """A payload that cannot be used, with the key at fault in the message."""


@dataclass(frozen=True)
class HealthPayload:
    """One canary request. Exactly one of `prompt` and `token_ids` is set, or neither (BOS)."""

    prompt: str | None = None
    token_ids: tuple[int, ...] | None = None
    max_tokens: int = 1
    temperature: float = 0.0

    @property
    def mode(self) -> str:
        return "text" if self.prompt is not None else "tokens"

    def resolve_tokens(self, bos_token_id: int | None) -> tuple[int, ...]:
        """The token ids to send in token mode: the configured ones, or [BOS]."""
        if self.token_ids is not None:
            return self.token_ids
        return (bos_token_id if bos_token_id is not None else DEFAULT_BOS_TOKEN_ID,)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        if self.token_ids is not None:
            out["token_ids"] = list(self.token_ids)
        return out


_KNOWN_KEYS = {"prompt", "token_ids", "max_tokens", "temperature", "sampling_options",
               "stop_conditions", "_HEALTH_CHECK", "ignore_eos", "stop", "stop_token_ids",
               "include_stop_str_in_output"}


def parse_payload(raw: Any, key: str = "health.payload") -> HealthPayload:
    """Build a payload from a TOML table or a JSON object; raise PayloadError naming the key."""
    if raw is None:
        return HealthPayload()
    if not isinstance(raw, dict):
        raise PayloadError(f"{key}: must be a table (JSON object), got {type(raw).__name__}")
    unknown = sorted(set(raw) - _KNOWN_KEYS)
    if unknown:
        raise PayloadError(f"{key}.{unknown[0]}: unknown key (known: prompt, token_ids, "
                           "max_tokens, temperature)")
    flat = dict(raw)
    for nested in ("sampling_options", "stop_conditions"):
        inner = flat.pop(nested, None)
        if inner is None:
            continue
        if not isinstance(inner, dict):
            raise PayloadError(f"{key}.{nested}: must be a table")
        for name in ("max_tokens", "temperature"):
            if name in inner and inner[name] is not None:
                flat.setdefault(name, inner[name])

    prompt = flat.get("prompt")
    token_ids = flat.get("token_ids")
    if prompt is not None and token_ids is not None:
        raise PayloadError(f"{key}: set either prompt or token_ids, not both")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise PayloadError(f"{key}.prompt: must be a non-empty string")
    if token_ids is not None and (
        not isinstance(token_ids, list) or not token_ids
        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in token_ids)
    ):
        raise PayloadError(f"{key}.token_ids: must be a non-empty list of token ids (integers ≥ 0)")

    max_tokens = flat.get("max_tokens", 1)
    if max_tokens is None:
        max_tokens = 1
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 64:
        raise PayloadError(f"{key}.max_tokens: must be an integer from 1 to 64")
    temperature = flat.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if (not isinstance(temperature, int | float) or isinstance(temperature, bool)
            or not math.isfinite(temperature) or temperature < 0):
        raise PayloadError(f"{key}.temperature: must be a number ≥ 0")
    return HealthPayload(
        prompt=prompt,
        token_ids=tuple(token_ids) if token_ids is not None else None,
        max_tokens=max_tokens,
        temperature=float(temperature),
    )


def parse_payload_env(value: str, key: str) -> HealthPayload:
    """Parse `DYN_HEALTH_CHECK_PAYLOAD`: inline JSON, or `@/path/to/file.json`."""
    text = value.strip()
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PayloadError(f"{key}: cannot read {path}: {exc}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PayloadError(f"{key}: not valid JSON: {exc}") from exc
    return parse_payload(raw, key)
