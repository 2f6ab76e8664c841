"""Idle sleep's logic: when it is due, and which sleeps a request undoes."""

from __future__ import annotations

import asyncio
from typing import Any

from dynamo_vllm.agent.idle_sleep import IdleSleep
from dynamo_vllm.agent.lifecycle import SleepController
from dynamo_vllm.agent.status import WorkerStatus
from dynamo_vllm.contract.protocol import WorkerState
from tests.harness.basics import FakeClock


class PausingEngine:
    """Just enough of AsyncLLM for level 0: pause and resume."""

    def __init__(self) -> None:
        self.paused = False

    def get_num_unfinished_requests(self) -> int:
        return 0

    async def pause_generation(self, **_: Any) -> None:
        self.paused = True

    async def resume_generation(self) -> None:
        self.paused = False


def setup(inflight: list[int]) -> tuple[IdleSleep, SleepController, WorkerStatus, FakeClock]:
    status = WorkerStatus()
    status.set(WorkerState.SERVING, "serving")

    async def nothing() -> None:
        return None

    controller = SleepController(PausingEngine(), status, status.set, nothing, nothing,
                                 inflight="drain", drain_timeout=1.0, memory_release=False)
    clock = FakeClock()
    return IdleSleep(controller, status, lambda: inflight[0], 30.0, 0, clock), controller, \
        status, clock


def test_due_only_after_a_quiet_serving_period() -> None:
    inflight = [0]
    idle, _, status, clock = setup(inflight)
    clock.now += 29
    assert not idle.due()
    clock.now += 2
    assert idle.due()
    idle.request_seen()
    clock.now += 29
    assert not idle.due()
    inflight[0] = 1  # a long stream is not idleness, however long
    clock.now += 300
    assert not idle.due()
    inflight[0] = 0
    clock.now += 29
    assert not idle.due()
    status.set(WorkerState.SLEEPING, "an operator's sleep")
    clock.now += 300
    assert not idle.due()
    status.set(WorkerState.SERVING, "awake")  # a fresh idle period from here
    clock.now += 29
    assert not idle.due()
    clock.now += 2
    assert idle.due()


def test_a_request_wakes_an_idle_sleep_but_not_an_operators() -> None:
    async def main() -> None:
        idle, controller, status, _ = setup([0])
        code, _ = await controller.sleep(0, idle=True)
        assert code == 200 and status.state is WorkerState.SLEEPING
        assert controller.describe()["idle"] is True
        # Two requests reach it asleep: one wake, both served.
        assert await asyncio.gather(idle.wake_for_request(), idle.wake_for_request()) == \
            [True, True]
        assert status.serving and idle.wakes == 1

        await controller.sleep(0)
        assert not await idle.wake_for_request()
        assert status.state is WorkerState.SLEEPING
        await controller.wake(None)

        await controller.sleep(0, idle=True)
        await controller.sleep(0)  # the operator takes over an idle sleep
        assert not await idle.wake_for_request()

    asyncio.run(main())


def test_a_request_during_an_idle_sleep_waits_and_wakes_the_worker() -> None:
    """Found by the sleep benchmark: a request that came while the idle sleep drained got a
    503 ("going to sleep") instead of waking the worker."""
    async def main() -> None:
        idle, controller, status, _ = setup([0])
        engine = controller.engine
        original_pause = engine.pause_generation

        async def slow_pause(**kwargs: Any) -> None:
            await asyncio.sleep(0.2)
            await original_pause(**kwargs)

        engine.pause_generation = slow_pause
        sleeping = asyncio.create_task(controller.sleep(0, idle=True))
        await asyncio.sleep(0.05)
        assert status.state is WorkerState.SLEEPING and controller.level is None
        assert await idle.wake_for_request()
        assert status.serving and (await sleeping)[0] == 200

    asyncio.run(main())
