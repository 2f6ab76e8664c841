"""The active canary: a one-token request when the engine has made no progress for a while.

vLLM's `check_health()` reads a flag, so it sees a dead engine and never a hung one (a
stopped EngineCore leaves it answering "healthy"). The canary sends the health-check
payload through the engine itself, under a timeout, whenever the engine has been idle or
stuck for `canary_idle` seconds; `canary_failures` failures in a row end the worker with
`ExitCode.UNHEALTHY`. A canary that times out while the engine went on making steps met a
slow or crowded engine (other requests ahead of it, a CPU shared with other engines), not a
hung one: that failure is logged and not counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from dynamo_vllm.agent.metrics import EngineGauges
from dynamo_vllm.agent.monitor import FailureHandler
from dynamo_vllm.agent.stall import StepTimes
from dynamo_vllm.agent.status import WorkerStatus
from dynamo_vllm.contract.payload import HealthPayload
from dynamo_vllm.contract.protocol import CANARY_REQUEST_PREFIX, ExitCode, WorkerState
from dynamo_vllm.contract.settings import HealthSection as HealthSettings

log = logging.getLogger(__name__)

# generate(prompt, max_tokens, temperature, request_id) -> the engine's output stream
Generate = Callable[[Any, int, float, str], AsyncIterator[Any]]


class Canary:
    def __init__(self, generate: Generate, status: WorkerStatus, payload: HealthPayload,
                 bos_token_id: int | None, idle: float, timeout: float, failures: int,
                 gauges: EngineGauges, on_failure: FailureHandler,
                 steps: StepTimes | None = None):
        self.generate = generate
        self.steps = steps
        self.status = status
        self.payload = payload
        self.prompt: Any = (payload.prompt if payload.prompt is not None
                            else {"prompt_token_ids": list(payload.resolve_tokens(bos_token_id))})
        self.idle = idle
        self.timeout = timeout
        self.max_failures = failures
        self.gauges = gauges
        self.on_failure = on_failure
        # After a failure, probe again soon rather than after another idle period.
        self.retry_after = min(idle, max(0.5, timeout))

    def next_probe_in(self) -> float:
        if self.status.canary_failures:
            return self.retry_after
        return max(0.05, self.idle - self.status.idle_for())

    async def probe(self) -> tuple[bool, str]:
        request_id = f"{CANARY_REQUEST_PREFIX}{uuid.uuid4().hex}"
        started = time.monotonic()

        async def one_request() -> None:
            async for _ in self.generate(self.prompt, self.payload.max_tokens,
                                         self.payload.temperature, request_id):
                pass

        try:
            await asyncio.wait_for(one_request(), self.timeout)
        except TimeoutError:
            return False, f"no answer within {self.timeout:g} s"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"
        elapsed = time.monotonic() - started
        self.gauges.canary_result(True, elapsed)
        return True, f"answered in {elapsed * 1000:.0f} ms"

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.next_probe_in())
            if self.status.state is not WorkerState.SERVING:
                continue
            if not self.status.canary_failures and self.status.idle_for() < self.idle:
                continue
            stepped_before = self.steps.last_step if self.steps else None
            ok, detail = await self.probe()
            if not ok and self.steps is not None and self.steps.last_step != stepped_before:
                log.info("canary slow (%s) while the engine went on making steps: a busy "
                         "engine, not a hung one; not counted", detail)
                continue
            if ok:
                if self.status.canary_failures:
                    log.info("canary recovered after %d failure(s): %s",
                             self.status.canary_failures, detail)
                self.status.canary_failures = 0
                self.status.progressed()
                continue
            self.gauges.canary_result(False)
            self.status.canary_failures += 1
            log.warning("canary failed (%d/%d): %s", self.status.canary_failures,
                        self.max_failures, detail)
            if self.status.canary_failures >= self.max_failures:
                self.on_failure(ExitCode.UNHEALTHY,
                                f"engine hung: {self.status.canary_failures} canary requests "
                                f"failed, last: {detail}")
                return


def engine_canary(engine: Any, config: HealthSettings, payload: HealthPayload,
                  bos_token_id: int | None, status: WorkerStatus, gauges: EngineGauges,
                  on_failure: FailureHandler, steps: StepTimes | None = None) -> Canary:
    """A canary that sends the payload through `engine` (vLLM's `AsyncLLM`)."""
    from vllm import SamplingParams

    def generate(prompt: Any, max_tokens: int, temperature: float,
                 request_id: str) -> AsyncIterator[Any]:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        stream: AsyncIterator[Any] = engine.generate(prompt, params, request_id=request_id)
        return stream

    return Canary(generate, status, payload, bos_token_id, config.canary_idle,
                  config.canary_timeout, config.canary_failures, gauges, on_failure, steps)
