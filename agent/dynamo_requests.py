"""Dynamo's token protocol mapped onto vLLM: a `PreprocessedRequest` in, response chunks out.

Dynamo's frontend tokenizes, applies the chat template and handles stop strings itself, then
sends the worker token ids with `sampling_options`, `stop_conditions` and `output_options`
(Dynamo's `dynamo/vllm/handlers.py: build_sampling_params` is the reference). The worker
answers with chunks `{"index", "token_ids"}`; the last one carries `finish_reason` and
`completion_usage`. Pure functions: the caller builds vLLM's `SamplingParams` from
`sampling_kwargs` and feeds engine outputs to `ChunkBuilder`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class RequestError(ValueError):
    """A request the engine cannot take, with the field at fault in the message."""


# Dynamo's sampling options that vLLM's SamplingParams takes under the same name.
SAMPLING_KEYS = ("n", "presence_penalty", "frequency_penalty", "repetition_penalty",
                 "temperature", "top_p", "top_k", "min_p", "seed", "logit_bias",
                 "allowed_token_ids", "bad_words")
# Stop conditions vLLM applies; `stop` (strings) is left out on purpose: the frontend
# detokenizes and cuts stop strings, so the engine must not stop early on them.
STOP_KEYS = ("max_tokens", "min_tokens", "ignore_eos")


def _options(request: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = request.get(key) or {}
    if not isinstance(value, Mapping):
        raise RequestError(f"{key}: must be an object, not {type(value).__name__}")
    return value


def prompt_tokens(request: Mapping[str, Any]) -> list[int]:
    tokens = request.get("token_ids")
    if not isinstance(tokens, list) or not tokens:
        raise RequestError("token_ids: must be a non-empty list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
        raise RequestError("token_ids: every entry must be an integer ≥ 0")
    return tokens


def sampling_kwargs(request: Mapping[str, Any], defaults: Mapping[str, Any],
                    max_model_len: int | None) -> dict[str, Any]:
    """Keyword arguments for vLLM's `SamplingParams`: the model's generation defaults, then
    the request's sampling options, stop conditions and output options over them."""
    kwargs: dict[str, Any] = dict(defaults)
    sampling = _options(request, "sampling_options")
    for key in SAMPLING_KEYS:
        if sampling.get(key) is not None:
            kwargs[key] = sampling[key]
    stop = _options(request, "stop_conditions")
    for key in STOP_KEYS:
        if stop.get(key) is not None:
            kwargs[key] = stop[key]
    # Token ids that end generation without showing up in the output (the model's EOS
    # variants the frontend knows of), added to whatever the model's defaults hold.
    hidden = stop.get("stop_token_ids_hidden")
    if hidden:
        kwargs["stop_token_ids"] = sorted(set(kwargs.get("stop_token_ids") or []) | set(hidden))
    output = _options(request, "output_options")
    for key in ("logprobs", "prompt_logprobs"):
        if output.get(key) is not None:
            kwargs[key] = output[key]
    if stop.get("max_tokens") is None and max_model_len is not None:
        # As vLLM's own server: whatever room the context leaves, at least one token.
        room = max(1, max_model_len - len(request.get("token_ids") or []))
        kwargs["max_tokens"] = min(int(defaults.get("max_tokens", room)), room)
    # Dynamo detokenizes in the frontend; the engine returns token ids only.
    kwargs["detokenize"] = False
    return kwargs


def finish_reason(reason: str | None) -> str | None:
    """vLLM's finish reason as Dynamo's frontend reads it: "abort" is "cancelled"."""
    if not reason:
        return None
    if reason.startswith("abort"):
        return "cancelled"
    return reason


def error_chunk(message: str) -> dict[str, Any]:
    """How Dynamo's backends end a stream on an engine error: the frontend turns it into an
    error for the client instead of a silent stop."""
    return {"index": 0, "token_ids": [], "finish_reason": f"error: {message}"}


@dataclass
class ChunkBuilder:
    """Turns a request's engine outputs (delta mode) into Dynamo response chunks."""

    generated: dict[int, int] = field(default_factory=dict)

    def chunks(self, prompt_token_ids: Sequence[int] | None, num_cached_tokens: int | None,
               outputs: Sequence[Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for output in outputs:
            index = int(getattr(output, "index", 0) or 0)
            token_ids = list(output.token_ids or [])
            self.generated[index] = self.generated.get(index, 0) + len(token_ids)
            reason = finish_reason(getattr(output, "finish_reason", None))
            if not token_ids and reason is None:
                continue
            chunk: dict[str, Any] = {"index": index, "token_ids": token_ids}
            if reason is not None:
                chunk["finish_reason"] = reason
                chunk["completion_usage"] = usage(prompt_token_ids, self.generated[index],
                                                  num_cached_tokens)
            out.append(chunk)
        return out


def usage(prompt_token_ids: Sequence[int] | None, completion_tokens: int,
          num_cached_tokens: int | None) -> dict[str, Any]:
    prompt = len(prompt_token_ids) if prompt_token_ids is not None else 0
    result: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                              "total_tokens": prompt + completion_tokens}
    if num_cached_tokens is not None:
        result["prompt_tokens_details"] = {"cached_tokens": int(num_cached_tokens)}
    return result
