"""Build vLLM's arguments and its `AsyncLLM` from the instance config.

The `[engine]` table goes through vLLM's own serve parser, so every engine argument vLLM
knows works unchanged, and `build_app`/`init_app_state` receive the namespace they
expect. Whatever vLLM refuses becomes an `EngineConfigError` naming the argument.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from typing import Any, NoReturn

from dynamo_vllm.contract.config import Config, engine_cli_args

log = logging.getLogger(__name__)


class EngineConfigError(Exception):
    """vLLM refused the engine arguments, or the engine cannot start with them."""


def serve_args(config: Config, index: int,
               kv_events_endpoint: str | None = None) -> argparse.Namespace:
    """vLLM's serve namespace for worker `index`, validated by vLLM's parser. With
    `kv_events_endpoint`, vLLM publishes its KV cache events there (Dynamo's KV router), unless
    the [engine] table sets kv_events_config itself."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class RaisingParser(FlexibleArgumentParser):
        # argparse prints usage and exits; a worker reports one line and the config code.
        def error(self, message: str) -> NoReturn:
            raise EngineConfigError(message)

    argv = [
        "--model", config.model.path,
        "--served-model-name", config.served_name,
        "--host", config.workers.host,
        "--port", str(config.worker_port(index)),
        *engine_cli_args(config.engine),
    ]
    if kv_events_endpoint and "kv_events_config" not in config.engine:
        argv += ["--kv-events-config", json.dumps({
            "enable_kv_cache_events": True, "publisher": "zmq",
            "endpoint": kv_events_endpoint, "topic": "kv-events"})]
    parser = make_arg_parser(RaisingParser(prog="dynamo-vllm worker"))
    args = parser.parse_args(argv)
    try:
        validate_parsed_serve_args(args)
    except (TypeError, ValueError) as exc:
        raise EngineConfigError(str(exc)) from exc
    return args


def engine_args_from(args: argparse.Namespace) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    engine_args = AsyncEngineArgs.from_cli_args(args)
    try:
        # Builds and validates vLLM's whole config without starting anything, so a bad
        # argument is reported before the model loads.
        engine_args.create_engine_config()
    except Exception as exc:  # pydantic ValidationError, ValueError, TypeError...
        raise EngineConfigError(_first_line(exc)) from exc
    return engine_args


def start_engine(engine_args: Any, stat_loggers: list[Any]) -> tuple[Any, float]:
    """Start the engine (blocking: run it off the event loop). Returns it and its start time."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    started = time.monotonic()
    engine = AsyncLLM.from_engine_args(
        engine_args, usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=stat_loggers)
    return engine, time.monotonic() - started


# A start failure that a restart cannot fix: the config must change (exit CONFIG, not retried).
PERMANENT_START_FAILURE = "not enough memory for the KV cache"


def start_failure_reason(exc: BaseException) -> str:
    """One line for an engine that failed to start, with the known causes named (those a
    restart cannot fix start with `PERMANENT_START_FAILURE`)."""
    text = _first_line(exc)
    chain = []
    current: BaseException | None = exc
    while current is not None:
        chain.append(str(current))
        current = current.__cause__ or current.__context__
    whole = " ".join(chain)
    if "memory" in whole.lower() and ("kv cache" in whole.lower() or "Available memory" in whole):
        return f"{PERMANENT_START_FAILURE}: {text}"
    return text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # pydantic puts the useful part on the line after its header.
    if len(lines) > 1 and "validation error" in lines[0]:
        return f"{lines[0]}: {' '.join(lines[1:3])}"
    return lines[0]


class EngineStartError(Exception):
    """The engine did not start. `permanent`: a restart cannot fix it (the KV cache does not
    fit): the worker exits CONFIG; otherwise START_FAILED, and the supervisor retries."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.permanent = reason.startswith(PERMANENT_START_FAILURE)


def bos_token_id(engine: Any) -> int | None:
    try:
        tokenizer = engine.get_tokenizer()
        bos = getattr(tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else None
    except Exception as exc:
        log.info("no BOS token from the tokenizer (%s); the canary uses token id 1", exc)
        return None


def refused_engine_key(config: Config, message: str) -> str:
    """Name the `engine.*` key behind a vLLM refusal, when the message names its flag."""
    for key in config.engine:
        flag = "--" + key.replace("_", "-")
        if re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", message) or \
                re.search(rf"\b{re.escape(key)}\b", message):
            return f"engine.{key}"
    return "engine"
