"""Everything that watches a serving engine, started and stopped together.

Four lines of defence, fastest first: the engine's processes' sentinels (a death, at once),
the stall check (a hang with work in flight, within a bound learned from the engine's own
steps), the canary (a hang while idle) and the `check_health()` monitor (vLLM's own flag,
for engines whose processes are not ours to watch).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from dynamo_vllm.agent.canary import engine_canary
from dynamo_vllm.agent.engine import bos_token_id
from dynamo_vllm.agent.engine_exit import EngineExitWatch, engine_processes, vllm_workers
from dynamo_vllm.agent.metrics import EngineGauges
from dynamo_vllm.agent.monitor import EngineMonitor, FailureHandler
from dynamo_vllm.agent.stall import StallWatch, StepTimes, engine_inflight
from dynamo_vllm.agent.status import WorkerStatus
from dynamo_vllm.contract.config import Config
from dynamo_vllm.contract.protocol import ExitCode

log = logging.getLogger(__name__)


class EngineWatchers:
    def __init__(self, engine: Any, config: Config, status: WorkerStatus, gauges: EngineGauges,
                 steps: StepTimes, on_failure: FailureHandler,
                 stopping: Callable[[], bool]):
        self.engine = engine
        self.config = config
        self.status = status
        self.gauges = gauges
        self.steps = steps
        self.on_failure = on_failure
        self.stopping = stopping
        processes = engine_processes(engine)
        self.exits = EngineExitWatch(processes, on_failure, vllm_workers(processes))
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        health = self.config.health
        if not self.exits.start():
            log.info("no engine process to watch in this process tree; the engine monitor "
                     "(every %g s) finds a dead engine", health.interval)
        monitor = EngineMonitor(self.engine, health.interval, health.check_timeout,
                                self.on_failure, (EngineDeadError,))
        self.spawn(monitor.run(), "engine monitor")
        stall = StallWatch(self.steps, engine_inflight(self.engine), self.status,
                           health.stall_floor, health.stall_factor, self.on_failure)
        self.spawn(stall.run(), "stall check")
        if health.canary:
            canary = engine_canary(self.engine, health, self.config.health_payload,
                                   bos_token_id(self.engine), self.status, self.gauges,
                                   self.on_failure, self.steps)
            self.spawn(canary.run(), "canary")

    def spawn(self, coro: Any, what: str) -> None:
        """Run `coro` beside the engine; if it crashes, the worker ends unhealthy."""
        task = asyncio.create_task(coro, name=what)

        def done(t: asyncio.Task[None]) -> None:
            if t.cancelled() or self.stopping():
                return
            exc = t.exception()
            if exc is not None:
                log.error("%s crashed: %r", what, exc, exc_info=exc)
                self.on_failure(ExitCode.UNHEALTHY, f"{what} crashed: {exc!r}")
        task.add_done_callback(done)
        self.tasks.append(task)

    def stop(self) -> None:
        self.exits.stop()
        for task in self.tasks:
            task.cancel()
