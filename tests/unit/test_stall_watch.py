"""The stall check's logic (a fake clock) and the engine-exit watch (real processes)."""

from __future__ import annotations

import asyncio
import multiprocessing
import time

import pytest

from dynamo_vllm.agent.engine_exit import EngineExitWatch
from dynamo_vllm.agent.stall import StallWatch, StepTimes
from dynamo_vllm.agent.status import WorkerStatus
from dynamo_vllm.contract.protocol import ExitCode, WorkerState
from tests.harness.basics import FakeClock


def serving() -> WorkerStatus:
    status = WorkerStatus()
    status.set(WorkerState.SERVING, "serving")
    return status


def watch(clock: FakeClock, inflight: list[int], floor: float = 3.0,
          factor: float = 20.0) -> tuple[StallWatch, StepTimes]:
    steps = StepTimes(clock)
    return StallWatch(steps, lambda: inflight[0], serving(), floor, factor,
                      lambda code, reason: None), steps


def test_step_times_learn_only_busy_gaps() -> None:
    clock = FakeClock()
    steps = StepTimes(clock)
    steps.stepped(busy=False)
    clock.now += 50  # idle: the engine waited for work, not a step
    steps.stepped(busy=True)
    for _ in range(200):
        clock.now += 0.01
        steps.stepped(busy=True)
    clock.now += 0.5
    steps.stepped(busy=True)
    assert steps.p99() == pytest.approx(0.01)
    clock.now += 0.3
    steps.stepped(busy=True)
    clock.now += 0.3
    steps.stepped(busy=True)
    assert steps.p99() == pytest.approx(0.3)


def test_idle_engine_is_never_judged() -> None:
    clock = FakeClock()
    stall, _ = watch(clock, [0])
    for _ in range(100):
        clock.now += 10
        assert stall.check(clock.now, late=False) is None


def test_silence_with_work_in_flight_past_the_floor_is_a_hang() -> None:
    clock = FakeClock()
    inflight = [0]
    stall, steps = watch(clock, inflight)
    clock.now += 60  # long idle before the request: not counted against the engine
    inflight[0] = 2
    assert stall.check(clock.now, late=False) is None
    clock.now += 2.9
    assert stall.check(clock.now, late=False) is None
    clock.now += 0.25
    assert stall.check(clock.now, late=False) is None  # first check past the bound
    clock.now += 0.25
    reason = stall.check(clock.now, late=False)
    assert reason is not None and "2 request(s) in flight" in reason
    steps.stepped(busy=True)
    assert stall.check(clock.now, late=False) is None


def test_bound_follows_the_engines_own_steps() -> None:
    clock = FakeClock()
    inflight = [1]
    stall, steps = watch(clock, inflight, floor=3.0, factor=20.0)
    steps.stepped(busy=True)
    for _ in range(100):
        clock.now += 0.5  # slow steps: 20 x 0.5 s = 10 s
        steps.stepped(busy=True)
    assert stall.bound() == pytest.approx(10.0)
    stall.check(clock.now, late=False)
    clock.now += 9.5
    assert stall.check(clock.now, late=False) is None
    clock.now += 0.6
    assert stall.check(clock.now, late=False) is None
    clock.now += 0.25
    assert stall.check(clock.now, late=False) is not None


def test_a_late_check_is_not_trusted() -> None:
    clock = FakeClock()
    stall, _ = watch(clock, [1])
    stall.check(clock.now, late=False)
    clock.now += 5
    assert stall.check(clock.now, late=True) is None
    clock.now += 0.25
    assert stall.check(clock.now, late=False) is None  # one check past the bound
    clock.now += 0.25
    assert stall.check(clock.now, late=False) is not None


def test_not_serving_is_never_judged() -> None:
    clock = FakeClock()
    stall, _ = watch(clock, [3])
    stall.status.set(WorkerState.SLEEPING, "asleep")
    for _ in range(10):
        clock.now += 10
        assert stall.check(clock.now, late=False) is None


def _sleep_then_exit(seconds: float, code: int) -> None:
    time.sleep(seconds)
    raise SystemExit(code)


def test_exit_watch_sees_a_process_end_at_once() -> None:
    proc = multiprocessing.get_context("spawn").Process(
        target=_sleep_then_exit, args=(0.3, 7), name="EngineCore_DP0")
    proc.start()
    seen: list[tuple[ExitCode, str, float]] = []

    async def main() -> None:
        done = asyncio.Event()

        def on_exit(code: ExitCode, reason: str) -> None:
            seen.append((code, reason, time.monotonic()))
            done.set()

        watch = EngineExitWatch([proc], on_exit)
        assert watch.start()
        await asyncio.wait_for(done.wait(), 20)

    asyncio.run(main())
    proc.join(5)
    assert len(seen) == 1
    code, reason, _ = seen[0]
    assert code is ExitCode.ENGINE_DEAD
    assert "EngineCore_DP0" in reason and f"pid {proc.pid}" in reason


def test_exit_watch_stopped_says_nothing() -> None:
    proc = multiprocessing.get_context("spawn").Process(target=_sleep_then_exit,
                                                        args=(0.2, 0))
    proc.start()
    seen: list[str] = []

    async def main() -> None:
        watch = EngineExitWatch([proc], lambda code, reason: seen.append(reason))
        watch.start()
        watch.stop()
        await asyncio.sleep(1.0)

    asyncio.run(main())
    proc.join(5)
    assert seen == []


def test_nothing_to_watch_without_processes() -> None:
    async def main() -> bool:
        return EngineExitWatch([], lambda code, reason: None).start()

    assert asyncio.run(main()) is False


def test_exit_watch_polls_the_engines_own_children() -> None:
    """A vLLM Worker process is EngineCore's child, not ours: its end is found by polling."""
    import subprocess
    import sys

    import psutil

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    seen: list[str] = []

    async def main() -> None:
        done = asyncio.Event()

        def on_exit(code: ExitCode, reason: str) -> None:
            seen.append(reason)
            done.set()

        watch = EngineExitWatch([], on_exit, [psutil.Process(child.pid)])
        watch.start()
        await asyncio.wait_for(done.wait(), 20)
        watch.stop()

    try:
        asyncio.run(main())
    finally:
        child.wait(10)
    assert seen == [f"engine dead: its vLLM Worker process (pid {child.pid}) ended"]
