"""Dynamo's token protocol onto vLLM: sampling options, stop conditions, output options,
finish reasons, usage, and cancellation; and the [dynamo] section with Dynamo's own
environment variables over it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from dynamo.llm.exceptions import EngineShutdown, InvalidArgument
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from dynamo_vllm.agent.dynamo_member import DynamoMember, control_allowed
from dynamo_vllm.agent.dynamo_requests import (
    ChunkBuilder,
    RequestError,
    finish_reason,
    prompt_tokens,
    sampling_kwargs,
)
from dynamo_vllm.contract import config as cfg
from dynamo_vllm.contract.dynamo_env import runtime_environment
from dynamo_vllm.contract.protocol import ExitCode

DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "stop_token_ids": [2]}


def request(**parts: Any) -> dict[str, Any]:
    return {"token_ids": [1, 5, 6], **parts}


def test_sampling_options_override_the_model_defaults() -> None:
    kwargs = sampling_kwargs(request(sampling_options={
        "temperature": 0.5, "top_k": 5, "seed": 7, "presence_penalty": 0.5,
        "frequency_penalty": None, "guided_decoding": None}), DEFAULTS, 512)
    params = SamplingParams(**kwargs)
    assert params.temperature == 0.5 and params.top_k == 5 and params.seed == 7
    assert params.presence_penalty == 0.5 and params.top_p == 0.9  # the model's default
    assert params.detokenize is False  # the frontend detokenizes


def test_stop_conditions_map_and_stop_strings_stay_with_the_frontend() -> None:
    kwargs = sampling_kwargs(request(stop_conditions={
        "max_tokens": 9, "min_tokens": 2, "ignore_eos": True, "stop": ["\n"],
        "stop_token_ids_hidden": [3, 2]}), DEFAULTS, 512)
    params = SamplingParams(**kwargs)
    assert params.max_tokens == 9 and params.min_tokens == 2 and params.ignore_eos
    assert params.stop == [] and sorted(params.stop_token_ids or []) == [2, 3]


def test_max_tokens_defaults_to_the_room_left_in_the_context() -> None:
    assert sampling_kwargs(request(), DEFAULTS, 512)["max_tokens"] == 64
    assert sampling_kwargs(request(), {}, 10)["max_tokens"] == 7
    assert sampling_kwargs({"token_ids": list(range(20))}, {}, 10)["max_tokens"] == 1


def test_output_options_ask_for_logprobs() -> None:
    kwargs = sampling_kwargs(request(output_options={"logprobs": 3, "prompt_logprobs": None}),
                             {}, 512)
    assert kwargs["logprobs"] == 3 and "prompt_logprobs" not in kwargs


@pytest.mark.parametrize("bad, field", [
    ({"token_ids": []}, "token_ids"),
    ({"token_ids": "1 2"}, "token_ids"),
    ({"token_ids": [1, -2]}, "token_ids"),
    ({"token_ids": [1, True]}, "token_ids"),
])
def test_bad_prompts_name_the_field(bad: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError, match=field):
        prompt_tokens(bad)


def test_malformed_option_objects_are_refused() -> None:
    with pytest.raises(RequestError, match="sampling_options"):
        sampling_kwargs(request(sampling_options=[1]), {}, 512)
    # A value vLLM refuses surfaces as its validation error (the endpoint turns it into an
    # error chunk for the client).
    with pytest.raises(VLLMValidationError):
        SamplingParams(**sampling_kwargs(request(sampling_options={"temperature": -1}), {},
                                         512))


def out(tokens: list[int], reason: str | None = None, index: int = 0) -> SimpleNamespace:
    return SimpleNamespace(index=index, token_ids=tokens, finish_reason=reason)


def test_chunks_carry_tokens_and_the_last_carries_finish_and_usage() -> None:
    builder = ChunkBuilder()
    prompt = [1, 2, 3, 4]
    assert builder.chunks(prompt, 0, [out([7, 8])]) == [{"index": 0, "token_ids": [7, 8]}]
    assert builder.chunks(prompt, 0, [out([])]) == []  # nothing new: nothing sent
    last = builder.chunks(prompt, 2, [out([9], "length")])
    assert last == [{"index": 0, "token_ids": [9], "finish_reason": "length",
                     "completion_usage": {"prompt_tokens": 4, "completion_tokens": 3,
                                          "total_tokens": 7,
                                          "prompt_tokens_details": {"cached_tokens": 2}}}]


def test_finish_reasons_as_dynamo_reads_them() -> None:
    assert finish_reason("stop") == "stop" and finish_reason("length") == "length"
    assert finish_reason("abort") == "cancelled" and finish_reason(None) is None


class FakeContext:
    """Dynamo's request context: an id, and a future that resolves when the client goes."""

    def __init__(self) -> None:
        self.stopped: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def id(self) -> str:
        return "ctx-1"

    def async_killed_or_stopped(self) -> asyncio.Future[bool]:
        return self.stopped


class SlowEngine:
    """An engine that streams one token a tick until aborted."""

    errored = False

    def __init__(self) -> None:
        self.aborted: list[str] = []

    async def generate(self, prompt: Any, params: Any, request_id: str,
                       lora_request: Any = None) -> Any:
        while request_id not in self.aborted:
            await asyncio.sleep(0.01)
            yield SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"],
                                  num_cached_tokens=0, outputs=[out([5])])
        yield SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], num_cached_tokens=0,
                              outputs=[out([], "abort")])

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def member(tmp_path: Path, accepting: bool = True) -> DynamoMember:
    config = cfg.from_dict({"model": {"path": str(model_dir(tmp_path))},
                            "dynamo": {"enabled": True}})
    m = DynamoMember(config, 0, lambda: accepting)
    m.engine = SlowEngine()
    return m


def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_cancellation_aborts_the_engine_request(tmp_path: Path) -> None:
    async def scenario() -> list[dict[str, Any]]:
        m = member(tmp_path)
        context = FakeContext()
        chunks = []
        async for chunk in m.generate(request(), context):
            chunks.append(chunk)
            if len(chunks) == 3:
                context.stopped.set_result(True)  # the client went away
        assert m.engine.aborted and m.engine.aborted[0].startswith("dynamo-ctx-1-")
        assert m.inflight == 0
        return chunks
    chunks = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert chunks[-1]["finish_reason"] == "cancelled"


def test_refusals_are_dynamos_typed_errors(tmp_path: Path) -> None:
    # Not serving (asleep, stopping): EngineShutdown, which the frontend migrates.
    with pytest.raises(EngineShutdown, match="not serving"):
        asyncio.run(asyncio.wait_for(_collect(member(tmp_path, accepting=False), request()), 10))
    # A bad request: InvalidArgument, which the frontend answers with a 4xx.
    with pytest.raises(InvalidArgument, match="bad request: token_ids"):
        asyncio.run(asyncio.wait_for(_collect(member(tmp_path), {"token_ids": []}), 10))
    with pytest.raises(InvalidArgument, match="temperature must be non-negative"):
        asyncio.run(asyncio.wait_for(_collect(member(tmp_path), request(
            sampling_options={"temperature": -1})), 10))


class RefusingEngine(SlowEngine):
    """An engine whose own validation refuses the request, as vLLM's does for a prompt
    longer than the context."""

    async def generate(self, prompt: Any, params: Any, request_id: str,
                       lora_request: Any = None) -> Any:
        from vllm.exceptions import VLLMValidationError

        raise VLLMValidationError("This model's maximum context length is 512 tokens.")
        yield  # an async generator, like vLLM's


def test_a_request_the_engine_refuses_is_a_4xx_not_a_500(tmp_path: Path) -> None:
    m = member(tmp_path)
    m.engine = RefusingEngine()
    with pytest.raises(InvalidArgument, match="bad request: This model's maximum context"):
        asyncio.run(asyncio.wait_for(_collect(m, request()), 10))
    assert m.inflight == 0


async def _collect(m: DynamoMember, body: dict[str, Any]) -> list[dict[str, Any]]:
    return [c async for c in m.generate(body, FakeContext())]


def test_requests_name_the_base_model_or_a_loaded_adapter(tmp_path: Path) -> None:
    m = member(tmp_path)
    m.adapters = lambda: {"sql": "the sql LoRARequest"}
    assert m._adapter_for(None) is None and m._adapter_for(tmp_path.name) is None
    assert m._adapter_for("sql") == "the sql LoRARequest"
    with pytest.raises(RequestError, match="'other' is neither"):
        m._adapter_for("other")


def test_dynamo_section_is_validated_with_its_key(tmp_path: Path) -> None:
    raw = {"model": {"path": str(model_dir(tmp_path))},
           "dynamo": {"enabled": "yes", "discovery_backend": "nats", "request_plane": "nats",
                      "file_kv": "relative/dir", "colour": 1}}
    with pytest.raises(cfg.ConfigError) as info:
        cfg.from_dict(raw)
    text = "\n".join(info.value.errors)
    for key in ("dynamo.enabled", "dynamo.discovery_backend", "dynamo.request_plane",
                "dynamo.file_kv", "dynamo.colour"):
        assert key in text, (key, text)


def test_dynamos_environment_overrides_the_section(tmp_path: Path) -> None:
    config = cfg.from_dict({"model": {"path": str(model_dir(tmp_path))},
                            "dynamo": {"enabled": True, "file_kv": "/srv/kv"}})
    env = {"DYN_DISCOVERY_BACKEND": "etcd", "DYN_FILE_KV": "/run/kv", "DYN_NAMESPACE": "prod",
           "ETCD_ENDPOINTS": "http://10.0.0.1:2379"}
    applied = cfg.apply_env(config, env)
    assert applied.dynamo.discovery_backend == "etcd" and applied.dynamo.file_kv == "/run/kv"
    assert applied.metrics.namespace == "prod"  # one name for the runtime and the labels
    assert runtime_environment(applied.dynamo, applied.discovery)["ETCD_ENDPOINTS"] \
        == "http://10.0.0.1:2379"
    with pytest.raises(cfg.ConfigError) as info:
        cfg.apply_env(config, {"DYN_REQUEST_PLANE": "nats", "DYN_NAMESPACE": "a.b"})
    assert "DYN_REQUEST_PLANE='nats'" in info.value.errors[0]
    assert "DYN_NAMESPACE" in info.value.errors[1]


def test_etcd_access_reaches_dynamos_runtime(tmp_path: Path) -> None:
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    password.chmod(0o600)
    config = cfg.from_dict({"model": {"path": str(model_dir(tmp_path))},
                            "dynamo": {"enabled": True, "discovery_backend": "etcd"},
                            "discovery": {"etcd_ca_file": "/etc/ca.pem", "etcd_user": "dynamo",
                                          "etcd_password_file": str(password)}},
                           check_paths=False)
    env = runtime_environment(config.dynamo, config.discovery)
    assert env["ETCD_AUTH_CA"] == "/etc/ca.pem" and env["ETCD_AUTH_USERNAME"] == "dynamo"
    assert env["ETCD_AUTH_PASSWORD"] == "s3cret" and "ETCD_AUTH_CLIENT_CERT" not in env


def test_control_endpoints_reach_the_network_only_when_opened_without_a_token(
        tmp_path: Path) -> None:
    def allowed(host: str, **workers: Any) -> bool:
        raw = {"model": {"path": str(model_dir(tmp_path))},
               "dynamo": {"enabled": True, "host": host}, "workers": workers}
        return control_allowed(cfg.from_dict(raw, check_paths=False))
    assert allowed("127.0.0.1") and allowed("::1")
    assert not allowed("10.0.0.5")
    assert allowed("10.0.0.5", control_from_network=True)
    assert not allowed("10.0.0.5", control_from_network=True,
                       control_token_file="/etc/dynamo-vllm/token")


def test_a_worker_out_of_dynamos_runtime_ends_unless_it_is_leaving(tmp_path: Path) -> None:
    failures: list[tuple[ExitCode, str]] = []
    m = member(tmp_path)
    m.fail = lambda code, why: failures.append((code, why))

    async def scenario() -> None:
        async def ended() -> None:
            return None
        lost = asyncio.ensure_future(ended())
        await lost
        m._served(lost)  # an endpoint stopped serving on its own: the lease is gone
        m.closing = True
        m._served(lost)  # stopped because the worker leaves: nothing to report
    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert len(failures) == 1 and failures[0][0] is ExitCode.UNHEALTHY
    assert "left Dynamo's runtime" in failures[0][1]
