"""The monitor's and the canary's decisions, against scripted engines (logic only)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry

from dynamo_vllm.agent.canary import Canary
from dynamo_vllm.agent.metrics import EngineGauges
from dynamo_vllm.agent.monitor import EngineMonitor
from dynamo_vllm.agent.status import WorkerStatus
from dynamo_vllm.contract.payload import HealthPayload
from dynamo_vllm.contract.protocol import ExitCode, WorkerState


class DeadError(Exception):
    pass


class ScriptedEngine:
    def __init__(self, script: list[Any]):
        self.script = script
        self.calls = 0

    async def check_health(self) -> None:
        step = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if step == "hang":
            await asyncio.sleep(3600)
        elif isinstance(step, BaseException):
            raise step


def run_monitor(script: list[Any], timeout: float = 0.2) -> tuple[list, EngineMonitor]:
    failures: list[tuple[ExitCode, str]] = []
    monitor = EngineMonitor(ScriptedEngine(script), 0.01, timeout,
                            lambda code, why: failures.append((code, why)), (DeadError,))
    asyncio.run(asyncio.wait_for(monitor.run(), 5))
    return failures, monitor


def test_dead_engine_ends_with_engine_dead() -> None:
    failures, _ = run_monitor([None, None, DeadError("gone")])
    assert failures == [(ExitCode.ENGINE_DEAD, "engine dead: gone")]


def test_check_timeout_ends_with_engine_dead() -> None:
    failures, _ = run_monitor([None, "hang"])
    assert failures[0][0] is ExitCode.ENGINE_DEAD and "timed out" in failures[0][1]


def test_unexpected_error_does_not_end_monitoring() -> None:
    failures, monitor = run_monitor([RuntimeError("odd"), RuntimeError("odd"), None,
                                     DeadError("gone")])
    assert monitor.unexpected_errors == 2
    assert failures[0][0] is ExitCode.ENGINE_DEAD


def test_zero_interval_disables() -> None:
    monitor = EngineMonitor(ScriptedEngine([DeadError()]), 0, 1, lambda c, w: None, (DeadError,))
    asyncio.run(asyncio.wait_for(monitor.run(), 1))
    assert monitor.engine.calls == 0


def make_canary(outcomes: list[str], status: WorkerStatus, failures: list,
                idle: float = 0.05) -> tuple[Canary, list]:
    prompts: list[Any] = []

    def generate(prompt: Any, max_tokens: int, temperature: float,
                 request_id: str) -> AsyncIterator[str]:
        prompts.append((prompt, max_tokens, temperature, request_id))
        outcome = outcomes[min(len(prompts) - 1, len(outcomes) - 1)]

        async def stream() -> AsyncIterator[str]:
            if outcome == "hang":
                await asyncio.sleep(3600)
            if outcome == "error":
                raise RuntimeError("engine said no")
            yield "token"
        return stream()

    canary = Canary(generate, status, HealthPayload(), bos_token_id=9, idle=idle, timeout=0.05,
                    failures=3, gauges=EngineGauges({"model": "m"}, CollectorRegistry()),
                    on_failure=lambda code, why: failures.append((code, why)))
    return canary, prompts


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_canary_hang_makes_worker_unhealthy() -> None:
    status = WorkerStatus(state=WorkerState.SERVING)
    failures: list = []
    canary, prompts = make_canary(["ok", "hang", "error", "hang"], status, failures)
    asyncio.run(asyncio.wait_for(canary.run(), 20))
    assert failures[0][0] is ExitCode.UNHEALTHY
    assert "3 canary requests failed" in failures[0][1]
    assert prompts[0][0] == {"prompt_token_ids": [9]} and prompts[0][1:3] == (1, 0.0)
    assert prompts[0][3].startswith("dynamo-canary-")


def test_canary_success_resets_failures_and_skips_busy_engine() -> None:
    status = WorkerStatus(state=WorkerState.SERVING)
    failures: list = []
    canary, prompts = make_canary(["hang", "hang", "ok", "ok"], status, failures, idle=0.3)

    async def scenario() -> None:
        task = asyncio.create_task(canary.run())
        try:
            await wait_until(lambda: len(prompts) >= 3 and status.canary_failures == 0)
            sent = len(prompts)
            # An engine that keeps making progress is never probed.
            for _ in range(20):
                status.progressed()
                await asyncio.sleep(0.02)
            assert len(prompts) <= sent + 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), 20))
    assert failures == []


def test_canary_waits_while_not_serving() -> None:
    status = WorkerStatus(state=WorkerState.LOADING)
    failures: list = []
    canary, prompts = make_canary(["hang"], status, failures)

    async def scenario() -> None:
        task = asyncio.create_task(canary.run())
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), 20))
    assert prompts == [] and failures == []


def test_a_slow_canary_while_the_engine_steps_is_not_a_failure() -> None:
    from dynamo_vllm.agent.stall import StepTimes

    status = WorkerStatus(state=WorkerState.SERVING)
    failures: list = []
    canary, prompts = make_canary(["hang"], status, failures)
    steps = StepTimes()
    canary.steps = steps

    async def scenario() -> None:
        async def engine_steps() -> None:
            while True:
                steps.stepped(busy=True)
                await asyncio.sleep(0.01)

        stepping = asyncio.create_task(engine_steps())
        task = asyncio.create_task(canary.run())
        try:
            await wait_until(lambda: len(prompts) >= 5)
            assert status.canary_failures == 0 and failures == []
            stepping.cancel()  # now the engine makes no step: the canary's failures count
            await asyncio.wait_for(task, 10)
        finally:
            task.cancel()
            stepping.cancel()
            await asyncio.gather(task, stepping, return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), 20))
    assert failures and failures[0][0] is ExitCode.UNHEALTHY
