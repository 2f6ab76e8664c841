"""One worker: a vLLM engine behind vLLM's OpenAI API, watched from inside.

Order of a life: validate the engine arguments with vLLM's parser, bind the port, answer
`/health` with `loading`, start the engine off the event loop, attach vLLM's app to it,
serve, and watch it with the engine monitor and the canary. It ends with an `ExitCode`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from typing import Any

from dynamo_vllm.agent.control import ControlRoutes
from dynamo_vllm.agent.dynamo_member import DynamoMember, health_tokens
from dynamo_vllm.agent.engine import (
    EngineConfigError,
    EngineStartError,
    bos_token_id,
    engine_args_from,
    serve_args,
    start_engine,
    start_failure_reason,
)
from dynamo_vllm.agent.idle_sleep import IdleSleep
from dynamo_vllm.agent.lifecycle import SleepController
from dynamo_vllm.agent.lora import LoraAdapters
from dynamo_vllm.agent.metrics import EngineGauges
from dynamo_vllm.agent.monitor import EngineErrorHook
from dynamo_vllm.agent.processes import descendants, kill_all, shutdown_engine, stop_output_handler
from dynamo_vllm.agent.publisher import StatLoggerFactory
from dynamo_vllm.agent.server import WorkerApp, bind_socket, make_server
from dynamo_vllm.agent.snapshot import (
    Answer,
    Outcome,
    SnapshotSettings,
    apply_env_changes,
    set_parent_death_signal,
    undo_capture_env,
    wait_for_checkpointer,
)
from dynamo_vllm.agent.stall import StepTimes
from dynamo_vllm.agent.status import WorkerStatus
from dynamo_vllm.agent.watchers import EngineWatchers
from dynamo_vllm.contract.config import Config, apply_env
from dynamo_vllm.contract.discovery import Discovery, EndpointRecord
from dynamo_vllm.contract.discovery.backends import Backend, backend_for
from dynamo_vllm.contract.gate import TokenFile
from dynamo_vllm.contract.labels import worker_labels
from dynamo_vllm.contract.protocol import Env, ExitCode, WorkerState

log = logging.getLogger(__name__)

# After a failed engine's processes are killed, its front-end needs only moments to let go.
FAILED_ENGINE_SHUTDOWN_S = 5.0


class Worker:
    def __init__(self, config: Config, index: int, snapshot: SnapshotSettings | None = None,
                 capture_env: dict[str, str | None] | None = None):
        self.config = config
        self.snapshot = snapshot
        self.capture_env = dict(capture_env or {})
        self._snapshot_task: asyncio.Task[None] | None = None
        self.index = index
        self.port = config.worker_port(index)
        self.status = WorkerStatus()
        self.steps = StepTimes()
        self.exit_code: ExitCode | None = None
        self.labels = worker_labels(config)
        self.gauges = EngineGauges(self.labels)
        self._stop = asyncio.Event()
        self.instance = os.environ.get(Env.INSTANCE) or config.served_name
        self.discovery = self._discovery()
        self.lora = LoraAdapters(list(config.lora.allowed_roots or []), self._republish)
        token = TokenFile(config.workers.control_token_file) \
            if config.workers.control_token_file else None
        self.control = ControlRoutes(allow_remote=config.workers.control_from_network,
                                     lora=self.lora, token=token)
        if snapshot is not None:
            self.control.snapshot = self.request_snapshot
        self.dynamo = DynamoMember(config, index, lambda: self.status.serving,
                                   self.lora.requests, self.fail) \
            if config.dynamo.enabled else None

    def _discovery(self) -> Discovery:
        backend = backend_for(self.config, self.instance, os.environ.get(Env.DISCOVERY_DIR))
        if backend.name is Backend.NONE and self.config.discovery.backend != Backend.NONE:
            log.info("no discovery directory (discovery.path, or run by the supervisor): "
                     "this worker is not published")
        return backend.publisher(self.index, on_error=self.gauges.discovery_error)

    def _record(self) -> EndpointRecord:
        return EndpointRecord(instance=self.instance, worker=self.index,
                              host=self.config.workers.host, port=self.port,
                              model=self.config.served_name, state=self.status.state.value,
                              pid=os.getpid(), lora_adapters=self.lora.names())

    async def register(self) -> None:
        await self.discovery.register(self._record())
        if self.dynamo is not None:
            await self.dynamo.register()

    async def _republish(self) -> None:
        """The record changed (adapters): publish it again if the worker is published."""
        if self.status.serving:
            try:
                await self.register()
            except Exception as exc:
                log.error("updating the discovery record failed: %s", exc)

    async def unregister(self) -> None:
        try:
            if self.dynamo is not None:
                await self.dynamo.unregister()
            await self.discovery.unregister()
        except Exception as exc:  # never let discovery stop a shutdown
            log.error("unregistering from discovery failed: %s", exc)

    def _set_state(self, state: WorkerState, reason: str) -> None:
        self.status.set(state, reason)
        self.gauges.set_state(state)

    def fail(self, code: ExitCode, reason: str) -> None:
        """Called by the monitor and the canary: end this worker with `code`."""
        if self.exit_code is not None:
            return
        log.error("worker %d: %s", self.index, reason)
        state = WorkerState.DEAD if code is ExitCode.ENGINE_DEAD else WorkerState.UNHEALTHY
        self._set_state(state, reason)
        self.exit_code = code
        self._stop.set()

    def request_stop(self, signame: str) -> None:
        if self.exit_code is None:
            self.exit_code = ExitCode.STOPPED
            self._set_state(WorkerState.DRAINING, f"stopping on {signame}")
        self._stop.set()

    async def run(self) -> ExitCode:
        """Serve until stopped or failed; raises EngineConfigError or PortInUse on bad input."""
        config, loop = self.config, asyncio.get_running_loop()
        # Bind first: a port conflict is reported at once, and /health answers while vLLM
        # is imported and the model loads.
        sock = bind_socket(config.workers.host, self.port)
        self.gauges.set_state(WorkerState.LOADING)
        identity = {"model": config.served_name, "worker": self.index, "port": self.port}
        app = WorkerApp(self.status, identity, self.control)
        server = make_server(app, config.logging.level, config.workers.drain_timeout)
        serve_task = asyncio.create_task(server.serve(sockets=[sock]))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        log.info("worker %d loading %s; health at http://%s:%d/health", self.index,
                 config.model.path, config.workers.host, self.port)

        factory = StatLoggerFactory(self.gauges, self.status, self.dynamo, self.steps)

        def prepare_and_start() -> tuple[Any, Any, float]:
            args = serve_args(config, self.index, self.dynamo.kv_events if self.dynamo else None)
            engine, seconds = start_engine(engine_args_from(args), [factory])
            return args, engine, seconds

        load = asyncio.ensure_future(asyncio.to_thread(prepare_and_start))
        stop_wait = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({load, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not load.done():
            # The engine start cannot be interrupted; end its processes instead of waiting.
            log.warning("worker %d: stop requested while loading; ending the engine processes",
                        self.index)
            await asyncio.to_thread(kill_all, descendants())
            await self._stop_server(server, serve_task, force=True)
            return ExitCode.STOPPED
        stop_wait.cancel()
        try:
            args, engine, load_seconds = load.result()
        except EngineConfigError as exc:
            self._set_state(WorkerState.DEAD, f"engine arguments refused: {exc}")
            await self._stop_server(server, serve_task, force=True)
            raise
        except Exception as exc:
            reason = start_failure_reason(exc)
            self._set_state(WorkerState.DEAD, f"engine failed to start: {reason}")
            await self._stop_server(server, serve_task, force=True)
            await asyncio.to_thread(kill_all, descendants())
            raise EngineStartError(reason) from exc

        try:
            await self._serve(engine, load_seconds, args, app, server, serve_task)
        finally:
            code = self.exit_code or ExitCode.STOPPED
            # On a failure the server stays up while the engine shuts down, so /health
            # tells the supervisor "dead" or "unhealthy" instead of refusing connections.
            timeout = config.health.shutdown_timeout
            if code in (ExitCode.UNHEALTHY, ExitCode.ENGINE_DEAD):
                # A hung engine cannot shut down gracefully (a stopped process does not even
                # see SIGTERM), and what is left of a dead one (its vLLM Worker processes)
                # has nothing to finish: kill them first, then release the front-end.
                await asyncio.to_thread(kill_all, descendants(), 0.1)
                timeout = min(timeout, FAILED_ENGINE_SHUTDOWN_S) if timeout else \
                    FAILED_ENGINE_SHUTDOWN_S
            await stop_output_handler(engine)
            await asyncio.to_thread(shutdown_engine, engine, timeout)
            await self._stop_server(server, serve_task, force=True)
        return code

    async def _serve(self, engine: Any, load_seconds: float, args: Any, app: WorkerApp,
                     server: Any, serve_task: asyncio.Task[None]) -> None:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app

        config = self.config
        # Built off the event loop, the engine starts its output handler lazily; start it
        # now so stats and progress flow before the first request.
        start_output_handler = getattr(engine, "_run_output_handler", None)
        if start_output_handler is not None:
            start_output_handler()
        tasks = await engine.get_supported_tasks()
        # vLLM's build_app sets the root logger to ERROR, which would silence the worker's
        # own INFO and WARNING lines (serving, canary failures) for the rest of its life.
        root_level = logging.getLogger().level
        vllm_app = build_app(args, tasks, engine.model_config)
        await init_app_state(engine, vllm_app.state, args, tasks)
        logging.getLogger().setLevel(root_level)
        vllm_app.state.server = EngineErrorHook(lambda: self.exit_code is not None, self.fail)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(vllm_app.router.lifespan_context(vllm_app))
            app.inner = vllm_app
            self.gauges.model_load_time.labels(**self.labels).set(load_seconds)
            self.status.progressed()
            self.control.engine = engine
            self.lora.engine = engine
            self.lora.models = vllm_app.state.openai_serving_models
            def admitted() -> int:
                return app.inflight + (self.dynamo.inflight if self.dynamo else 0)
            self.control.controller = SleepController(
                engine, self.status, self._set_state, self.register, self.unregister,
                inflight=config.sleep.inflight, drain_timeout=config.sleep.drain_timeout,
                memory_release=bool(getattr(engine.model_config, "enable_sleep_mode", False)),
                admitted=admitted)
            if self.snapshot is not None and self.snapshot.at_start and self.exit_code is None:
                await self._snapshot_at_start(engine)
            if self.exit_code is None:
                if self.dynamo is not None:
                    await self.dynamo.start(engine, self.control.controller,
                                            health_tokens(config, engine), app.identity)
                self._set_state(WorkerState.SERVING, f"serving {config.served_name}")
                await self.register()
            log.info("worker %d serving %s at http://%s:%d/v1 (engine started in %.1f s)",
                     self.index, config.served_name, config.workers.host, self.port, load_seconds)

            watchers = EngineWatchers(engine, config, self.status, self.gauges, self.steps,
                                      self.fail, self._stop.is_set)
            watchers.start()
            if config.sleep.idle_after > 0:
                app.idle = IdleSleep(self.control.controller, self.status, admitted,
                                     config.sleep.idle_after, config.sleep.idle_level)
                watchers.spawn(app.idle.run(), "idle sleep")

            stop_wait = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({stop_wait, serve_task}, return_when=asyncio.FIRST_COMPLETED)
            if not self._stop.is_set():
                self.fail(ExitCode.UNHEALTHY, "the HTTP server stopped unexpectedly")
            stop_wait.cancel()
            if self._snapshot_task is not None:
                self._snapshot_task.cancel()
            # Out of discovery first, so no new request is routed here while we go.
            await self.unregister()
            if self.dynamo is not None:
                await self.dynamo.close()
            watchers.stop()
            if self.exit_code is ExitCode.STOPPED:
                # Let requests in flight finish while vLLM's app still stands.
                await self._stop_server(server, serve_task, force=False)
            app.inner = None  # vLLM's app is torn down with its lifespan below

    # ------------------------------------------------------------ checkpoint/restore

    async def _snapshot_at_start(self, engine: Any) -> None:
        """Warm up, pause, sleep, and wait for the checkpointer (before serving at all)."""
        assert self.snapshot is not None
        from vllm import SamplingParams

        started = time.monotonic()
        prompt = {"prompt_token_ids": [bos_token_id(engine) or 1]}
        async for _ in engine.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0),
                                       request_id="dynamo-snapshot-warmup"):
            pass
        await engine.pause_generation(mode="abort", clear_cache=False)
        level = self._sleep_level(engine)
        if level >= 1:
            await engine.sleep(level)
        log.info("worker %d warmed up and paused for a checkpoint in %.1f s", self.index,
                 time.monotonic() - started)
        answer = await self._wait_for_checkpointer()
        if answer.outcome is Outcome.CHECKPOINTED:
            return
        if level >= 1:
            await engine.wake_up(None)
        await engine.resume_generation()
        self.status.progressed()

    def _sleep_level(self, engine: Any) -> int:
        assert self.snapshot is not None
        # The CPU engine has no sleep mode: pausing is all it can do.
        if not getattr(engine.model_config, "enable_sleep_mode", False):
            return 0
        return self.snapshot.sleep_level

    async def _wait_for_checkpointer(self) -> Answer:
        assert self.snapshot is not None
        self._set_state(WorkerState.CHECKPOINT, "paused, ready for a checkpoint")
        # The process image should not carry garbage, and CRIU restores the parent-death
        # signal while the restored process's first parent (criu) exits at once.
        gc.collect()
        set_parent_death_signal(0)
        answer = await wait_for_checkpointer(self.snapshot, self.index)
        if answer.outcome is Outcome.CHECKPOINTED:
            log.info("worker %d: checkpoint taken; exiting", self.index)
            self.exit_code = ExitCode.CHECKPOINTED
            self._set_state(WorkerState.DRAINING, "checkpoint taken; exiting")
            self._stop.set()
            return answer
        self._after_restore(answer)
        return answer

    def _after_restore(self, answer: Answer) -> None:
        """Refresh what CRIU brought back from checkpoint time: the environment, the parent
        to die with, and the discovery backend that reads them."""
        apply_env_changes(os.environ, answer.env_changes)
        undo_capture_env(os.environ, self.capture_env)
        self.capture_env = {}
        supervisor = os.environ.get(Env.SUPERVISOR_PID)
        if supervisor and str(os.getppid()) == supervisor:
            set_parent_death_signal(signal.SIGTERM)
        elif supervisor:
            log.warning("worker %d: parent %d is not the supervisor %s; not tied to it",
                        self.index, os.getppid(), supervisor)
        self.config = apply_env(self.config, os.environ)
        self.instance = os.environ.get(Env.INSTANCE) or self.config.served_name
        self.discovery = self._discovery()
        what = ("restored" if answer.outcome is Outcome.RESTORED
                else "no checkpointer answered")
        log.info("worker %d: %s after %.1f s (%d environment name(s) refreshed)", self.index,
                 what, answer.waited_s, len(answer.env_changes))

    def request_snapshot(self) -> tuple[int, dict[str, Any]]:
        """POST /engine/snapshot: leave the pool, pause, and wait for a checkpoint."""
        controller = self.control.controller
        if controller is None or not self.status.serving:
            return 409, {"status": "error", "message": "a checkpoint is taken only while "
                         f"serving; the worker is {self.status.state.value}"}
        if self._snapshot_task is not None and not self._snapshot_task.done():
            return 409, {"status": "error", "message": "already waiting for a checkpoint"}
        if self.dynamo is not None and self.dynamo.runtime is not None:
            # Every life restored from such an image would carry this life's Dynamo
            # instance id and connections; the checkpoint at start comes before the runtime.
            return 409, {"status": "error", "message": "with [dynamo] on, a checkpoint is "
                         "taken only as a worker starts, before it joins Dynamo's runtime; "
                         "not while it serves"}
        self._snapshot_task = asyncio.create_task(self._snapshot_on_request(controller),
                                                  name="snapshot")
        return 202, {"status": "ok", "message": "draining; ready-for-snapshot follows"}

    async def _snapshot_on_request(self, controller: SleepController) -> None:
        assert self.snapshot is not None
        code, reply = await controller.sleep(self._sleep_level(controller.engine))
        if code != 200:
            log.error("worker %d: cannot pause for a checkpoint: %s", self.index,
                      reply.get("message"))
            return
        answer = await self._wait_for_checkpointer()
        if answer.outcome is Outcome.CHECKPOINTED:
            return
        code, reply = await controller.wake(None)
        if code != 200:
            self.fail(ExitCode.UNHEALTHY, f"cannot wake after a checkpoint: {reply.get('message')}")

    async def _stop_server(self, server: Any, serve_task: asyncio.Task[None],
                           force: bool) -> None:
        """Stop accepting; a graceful stop lets requests in flight finish (drain_timeout)."""
        if serve_task.done():
            return
        server.should_exit = True
        if force:
            server.force_exit = True
        limit = self.config.workers.drain_timeout + 5
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(serve_task, limit)


__all__ = ["EngineConfigError", "EngineStartError", "Worker"]
