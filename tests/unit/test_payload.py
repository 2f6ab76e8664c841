from __future__ import annotations

import pytest

from dynamo_vllm.contract.payload import (
    DEFAULT_BOS_TOKEN_ID,
    HealthPayload,
    PayloadError,
    parse_payload,
)


def test_default_is_token_mode_with_bos() -> None:
    payload = parse_payload(None)
    assert payload.mode == "tokens"
    assert payload.resolve_tokens(7) == (7,)
    assert payload.resolve_tokens(None) == (DEFAULT_BOS_TOKEN_ID,)
    assert payload.max_tokens == 1 and payload.temperature == 0.0


def test_text_mode() -> None:
    payload = parse_payload({"prompt": "Test"})
    assert payload.mode == "text" and payload.prompt == "Test"


def test_dynamo_nested_form() -> None:
    payload = parse_payload({"token_ids": [1, 2], "_HEALTH_CHECK": True,
                             "sampling_options": {"temperature": 0.5},
                             "stop_conditions": {"max_tokens": 3, "ignore_eos": False}})
    assert payload == HealthPayload(token_ids=(1, 2), max_tokens=3, temperature=0.5)


@pytest.mark.parametrize(("raw", "message"), [
    ({"prompt": "a", "token_ids": [1]}, "either prompt or token_ids"),
    ({"prompt": ""}, "prompt: must be a non-empty string"),
    ({"token_ids": []}, "token_ids: must be a non-empty list"),
    ({"token_ids": [-1]}, "token_ids: must be a non-empty list"),
    ({"max_tokens": 0}, "max_tokens: must be an integer from 1 to 64"),
    ({"temperature": -1}, "temperature: must be a number"),
    ({"promt": "x"}, "health.payload.promt: unknown key"),
    ("text", "must be a table"),
])
def test_bad_payloads_name_the_key(raw: object, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        parse_payload(raw)
