"""The worker as a member of Dynamo's distributed runtime ([dynamo] enabled = true).

On the worker's own `AsyncLLM` and event loop: register the model card with Dynamo's
discovery, serve `generate` (tokens in, tokens out) with the health-check payload the
runtime sends when idle, serve `sleep`, `wake_up` and `clear_kv_blocks`, relay vLLM's KV
cache events to the event plane, and publish load for the KV router.

Why the `DistributedRuntime` endpoint API and not `dynamo.common.backend.Worker`: that Worker
owns the process (its signal handlers, its shutdown, the engine's start and end), while this
worker already has a monitor, a canary, a sleep controller, an HTTP server and signal
handling that the supervisor relies on. Endpoints let the runtime be one more face of the
same engine, started after the engine serves and taken down before it stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from dynamo_vllm.agent.dynamo_requests import (
    ChunkBuilder,
    RequestError,
    error_chunk,
    prompt_tokens,
    sampling_kwargs,
)
from dynamo_vllm.agent.engine import bos_token_id
from dynamo_vllm.agent.lifecycle import SleepController
from dynamo_vllm.contract.config import Config
from dynamo_vllm.contract.dynamo_env import runtime_environment
from dynamo_vllm.contract.gate import is_loopback
from dynamo_vllm.contract.protocol import Env, ExitCode

log = logging.getLogger(__name__)

KV_EVENTS_TOPIC = "kv-events"


def health_tokens(config: Config, engine: Any) -> list[int]:
    """The health-check payload as token ids: what the runtime sends `generate` when idle
    (the text form is tokenized here, since the endpoint takes tokens)."""
    payload = config.health_payload
    if payload.prompt is not None:
        tokens: list[int] = engine.get_tokenizer().encode(payload.prompt)
        return tokens
    return list(payload.resolve_tokens(bos_token_id(engine)))


def control_allowed(config: Config) -> bool:
    """Whether the state-changing endpoints go on the request plane: always on loopback; on a
    network address only when the operator opened control to the network without a token
    (Dynamo's requests cannot carry one)."""
    if is_loopback(config.dynamo.host):
        return True
    return config.workers.control_from_network and not config.workers.control_token_file


class DynamoMember:
    def __init__(self, config: Config, index: int, accepting: Callable[[], bool],
                 adapters: Callable[[], dict[str, Any]] = dict,
                 fail: Callable[[ExitCode, str], None] = lambda code, why: None):
        self.config = config
        self.fail = fail
        self.closing = False
        self.index = index
        self.accepting = accepting
        # The LoRA adapters vLLM serves, by name (its LoRARequests); each gets a model card.
        self.adapters = adapters
        self.adapter_cards: set[str] = set()
        self.block_size = 0
        self.inflight = 0
        self.registered = False
        self.runtime: Any = None
        self.generate_endpoint: Any = None
        self.load_publisher: Any = None
        self.kv_publishers: list[Any] = []
        self.serving: list[asyncio.Task[None]] = []
        self.engine: Any = None
        self.controller: SleepController | None = None
        self.defaults: dict[str, Any] = {}
        self.max_model_len: int | None = None
        self.total_blocks = 0
        # vLLM's KV event publisher binds here: a socket file in a directory only this
        # user can enter, so no port is opened to the network and none can collide. Under
        # the supervisor, the worker's own socket directory (the same path in every life, as
        # a restore needs); alone, a temporary one.
        given = os.environ.get(Env.SOCKET_DIR)
        self._own_event_dir = not given
        self._event_dir = given or tempfile.mkdtemp(prefix=f"dynamo-vllm-kv-{index}-")
        self.kv_events: str | None = (
            f"ipc://{self._event_dir}/events" if config.dynamo.kv_events else None)

    @property
    def path(self) -> str:
        metrics = self.config.metrics
        return f"{metrics.namespace}.{metrics.component}"

    async def start(self, engine: Any, controller: SleepController, health_tokens: list[int],
                    identity: dict[str, Any]) -> None:
        """Join the runtime and register the model: call once the engine serves. The
        instance id goes into `identity` (the worker's /health), as discovery names it."""
        from dynamo.llm import ModelInput, ModelType, WorkerType, register_model
        from dynamo.runtime import DistributedRuntime

        self.engine, self.controller = engine, controller
        dynamo = self.config.dynamo
        os.environ.update(runtime_environment(dynamo, self.config.discovery))
        loop = asyncio.get_running_loop()
        self.runtime = DistributedRuntime(loop, dynamo.discovery_backend, dynamo.request_plane,
                                          event_plane=dynamo.event_plane)
        vllm_config = engine.vllm_config
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.defaults = dict(vllm_config.model_config.get_diff_sampling_param())
        cache = vllm_config.cache_config
        self.total_blocks = int(cache.num_gpu_blocks or 0)
        self.generate_endpoint = self.runtime.endpoint(
            f"{self.path}.{self.config.metrics.endpoint}")
        self.block_size = int(cache.block_size)
        await self._start_load_publisher()
        self._start_kv_publishers(vllm_config)

        await register_model(
            ModelInput.Tokens, ModelType.Chat | ModelType.Completions, self.generate_endpoint,
            self.config.model.path, self.config.served_name,
            worker_type=WorkerType.Aggregated, kv_cache_block_size=self.block_size,
            runtime_config=self._runtime_config())
        labels = [("model", self.config.served_name)]
        health = {"token_ids": health_tokens, "sampling_options": {"temperature": 0.0},
                  "stop_conditions": {"max_tokens": 1, "ignore_eos": False},
                  "_HEALTH_CHECK": True}
        self._serve(self.generate_endpoint, self.generate, labels, health)
        if control_allowed(self.config):
            for name, handler in (("sleep", self.sleep), ("wake_up", self.wake_up),
                                  ("clear_kv_blocks", self.clear_kv_blocks)):
                self._serve(self.runtime.endpoint(f"{self.path}.{name}"), handler, labels, None)
        else:
            log.warning("Dynamo's sleep, wake_up and clear_kv_blocks are not served: the "
                        "request plane listens on %s, and Dynamo's requests carry no token "
                        "(workers.control_token_file); the worker's own routes still work",
                        dynamo.host)
        self.registered = True
        identity["dynamo_instance"] = f"{self.generate_endpoint.connection_id():x}"
        log.info("worker %d joined Dynamo's runtime as %s.%s, instance %s (discovery %s)",
                 self.index, self.path, self.config.metrics.endpoint,
                 identity["dynamo_instance"], dynamo.discovery_backend)

    def _runtime_config(self) -> Any:
        from dynamo.llm import ModelRuntimeConfig

        vllm_config = self.engine.vllm_config
        runtime_config = ModelRuntimeConfig()
        runtime_config.context_length = self.max_model_len
        runtime_config.total_kv_blocks = self.total_blocks
        runtime_config.max_num_seqs = int(vllm_config.scheduler_config.max_num_seqs)
        runtime_config.max_num_batched_tokens = int(
            vllm_config.scheduler_config.max_num_batched_tokens)
        runtime_config.enable_local_indexer = True
        runtime_config.kv_event_publishing_enabled = bool(self.kv_publishers)
        return runtime_config

    async def _sync_adapters(self) -> None:
        """A model card for every adapter vLLM serves, and none for one it dropped."""
        from dynamo.llm import ModelInput, ModelType, WorkerType, register_model, unregister_model

        loaded = set(self.adapters())
        for name in sorted(loaded - self.adapter_cards):
            await register_model(
                ModelInput.Tokens, ModelType.Chat | ModelType.Completions,
                self.generate_endpoint, self.config.model.path, name,
                worker_type=WorkerType.Aggregated, kv_cache_block_size=self.block_size,
                runtime_config=self._runtime_config(), lora_name=name,
                base_model_path=self.config.model.path, ignore_weights=True,
                user_data={"lora_adapter": True})
            self.adapter_cards.add(name)
            log.info("adapter %s registered with Dynamo", name)
        for name in sorted(self.adapter_cards - loaded):
            await unregister_model(self.generate_endpoint, lora_name=name)
            self.adapter_cards.discard(name)
            log.info("adapter %s unregistered from Dynamo", name)

    def _serve(self, endpoint: Any, handler: Any, labels: list[tuple[str, str]],
               health: dict[str, Any] | None) -> None:
        coro = endpoint.serve_endpoint(handler, graceful_shutdown=True, metrics_labels=labels,
                                       health_check_payload=health)
        task = asyncio.ensure_future(coro)
        task.add_done_callback(self._served)
        self.serving.append(task)

    def _served(self, task: asyncio.Future[Any]) -> None:
        if self.closing:
            return
        why = "ended" if task.cancelled() or task.exception() is None \
            else f"failed: {task.exception()!r}"
        # Out of Dynamo's runtime (its etcd lease lost, the runtime shut down) while the
        # worker still serves its own port: say so and end, so that the supervisor's restart
        # joins it again, instead of serving on invisible to every frontend.
        self.fail(ExitCode.UNHEALTHY, f"a Dynamo endpoint stopped serving ({why}): this worker "
                                      "left Dynamo's runtime")

    async def _start_load_publisher(self) -> None:
        from dynamo.llm import WorkerMetricsPublisher

        publisher = WorkerMetricsPublisher()
        await publisher.create_endpoint(self.generate_endpoint)
        self.load_publisher = publisher
        publisher.publish(0, kv_used_blocks=0)

    def publish_load(self, dp_rank: int, cache_usage: float) -> None:
        """From the stat logger after every engine step: blocks in use, as the router reads."""
        if self.load_publisher is not None:
            self.load_publisher.publish(dp_rank, kv_used_blocks=int(
                self.total_blocks * cache_usage))

    def _start_kv_publishers(self, vllm_config: Any) -> None:
        if self.kv_events is None:
            return
        from dynamo.llm import KvEventPublisher

        parallel = vllm_config.parallel_config
        first = int(getattr(parallel, "data_parallel_rank", 0) or 0)
        for rank in range(first, first + int(parallel.data_parallel_size_local or 1)):
            suffix = "" if rank == 0 else f"_dp{rank}"
            self.kv_publishers.append(KvEventPublisher(
                endpoint=self.generate_endpoint, kv_block_size=self.block_size,
                zmq_endpoint=f"{self.kv_events}{suffix}", zmq_topic=KV_EVENTS_TOPIC,
                enable_local_indexer=True, dp_rank=rank))

    async def register(self) -> None:
        """Back in discovery (after a wake), with the adapters' cards as they are now."""
        if self.generate_endpoint is None:
            return
        if not self.registered:
            await self.generate_endpoint.register_endpoint_instance()
            self.registered = True
        await self._sync_adapters()

    async def unregister(self) -> None:
        if self.generate_endpoint is not None and self.registered:
            await self.generate_endpoint.unregister_endpoint_instance()
            self.registered = False

    async def close(self) -> None:
        """Leave discovery and the runtime (the worker stops after this)."""
        self.closing = True
        try:
            await self.unregister()
        except Exception as exc:
            log.error("leaving Dynamo's discovery failed: %s", exc)
        for publisher in self.kv_publishers:
            publisher.shutdown()
        if self.runtime is not None:
            # The endpoints stop taking requests and let those in flight finish.
            self.runtime.shutdown()
        if self.serving:
            await asyncio.wait(self.serving, timeout=self.config.workers.drain_timeout)
        for task in self.serving:
            task.cancel()
        if self._own_event_dir:
            shutil.rmtree(self._event_dir, ignore_errors=True)

    # ------------------------------------------------------------------ endpoints

    async def generate(self, request: dict[str, Any], context: Any) -> AsyncIterator[Any]:
        from dynamo.llm.exceptions import EngineShutdown, InvalidArgument
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        if not self.accepting():
            # Asleep or stopping (the frontend had not yet seen it leave): another worker
            # can take the request.
            raise EngineShutdown("this worker is not serving (asleep or stopping)")
        try:
            tokens = prompt_tokens(request)
            params = SamplingParams(**sampling_kwargs(request, self.defaults, self.max_model_len))
            params.output_kind = RequestOutputKind.DELTA
            adapter = self._adapter_for(request.get("model"))
        except Exception as exc:  # RequestError, or vLLM's own validation of the values
            # Dynamo's typed error: the frontend answers the client with a 4xx.
            raise InvalidArgument(f"bad request: {exc}") from exc
        # The context id repeats when the frontend migrates a request: keep vLLM's unique.
        request_id = f"dynamo-{context.id()}-{uuid.uuid4().hex[:8]}"
        builder = ChunkBuilder()
        self.inflight += 1
        cancel = asyncio.ensure_future(self._abort_when_cancelled(context, request_id))
        answered = False
        try:
            async for output in self.engine.generate({"prompt_token_ids": tokens}, params,
                                                     request_id=request_id,
                                                     lora_request=adapter):
                for chunk in builder.chunks(output.prompt_token_ids, output.num_cached_tokens,
                                            output.outputs):
                    answered = True
                    yield chunk
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self.engine.errored:
                # Dynamo's typed error for a worker going away: the frontend migrates the
                # request to another worker (or, with migration off, fails it explicitly).
                log.error("Dynamo request %s cut: the engine is dead (%r)", request_id, exc)
                raise EngineShutdown(f"the engine died during generation: {exc}") from exc
            if isinstance(exc, VLLMClientError) or (not answered and isinstance(exc, ValueError)):
                # vLLM refused the request itself (a prompt longer than the context): the
                # client's error, which the frontend answers with a 4xx, not a 500.
                log.info("Dynamo request %s refused: %s", request_id, exc)
                raise InvalidArgument(f"bad request: {exc}") from exc
            log.error("Dynamo request %s failed: %r", request_id, exc)
            yield error_chunk(f"{type(exc).__name__}: {exc}")
        finally:
            cancel.cancel()
            self.inflight -= 1

    def _adapter_for(self, model: Any) -> Any:
        """The LoRARequest a request's model names; None for the base model."""
        if not model or model == self.config.served_name:
            return None
        adapter = self.adapters().get(model)
        if adapter is None:
            raise RequestError(f"model: {model!r} is neither {self.config.served_name!r} nor a "
                               "loaded adapter")
        return adapter

    async def _abort_when_cancelled(self, context: Any, request_id: str) -> None:
        await context.async_killed_or_stopped()
        await asyncio.shield(self.engine.abort(request_id))

    async def sleep(self, request: dict[str, Any], context: Any = None) -> AsyncIterator[Any]:
        assert self.controller is not None
        level = request.get("level", 1) if isinstance(request, dict) else 1
        if not isinstance(level, int) or isinstance(level, bool) or level not in (0, 1, 2):
            yield {"status": "error", "message": "level must be 0, 1 or 2"}
            return
        _, body = await self.controller.sleep(level)
        yield body

    async def wake_up(self, request: dict[str, Any], context: Any = None) -> AsyncIterator[Any]:
        assert self.controller is not None
        tags = request.get("tags") if isinstance(request, dict) else None
        if tags is not None and not (isinstance(tags, list) and
                                     all(isinstance(t, str) for t in tags)):
            yield {"status": "error", "message": "tags must be a list of strings"}
            return
        _, body = await self.controller.wake(tags)
        yield body

    async def clear_kv_blocks(self, request: Any = None,
                              context: Any = None) -> AsyncIterator[Any]:
        try:
            await self.engine.reset_prefix_cache()
            yield {"status": "success", "message": "KV cache cleared"}
        except Exception as exc:
            yield {"status": "error", "message": str(exc)}
