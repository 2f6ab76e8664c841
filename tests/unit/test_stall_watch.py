"""The stall check's logic (a fake clock) and the engine-exit watch (real processes)."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from pathlib import Path

import pytest

from dynamo_vllm.agent.engine_exit import EngineExitWatch
from dynamo_vllm.agent.stall import StallWatch, StepTimes, cpu_pressure
from dynamo_vllm.agent.status import WorkerStatus
from dynamo_vllm.contract.protocol import ExitCode, WorkerState
from tests.harness.basics import FakeClock


def serving() -> WorkerStatus:
    status = WorkerStatus()
    status.set(WorkerState.SERVING, "serving")
    return status


def watch(clock: FakeClock, inflight: list[int], floor: float = 3.0, factor: float = 20.0,
          pressure: list[float] | None = None) -> tuple[StallWatch, StepTimes]:
    """`pressure`: the machine's CPU pressure total (seconds), moved by the test; none by
    default, whatever this machine's own is."""
    steps = StepTimes(clock)
    waited = pressure if pressure is not None else [0.0]
    return StallWatch(steps, lambda: inflight[0], serving(), floor, factor,
                      lambda code, reason: None, pressure=lambda: waited[0]), steps


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


def test_silence_while_the_cpus_are_taken_counts_at_most_half() -> None:
    """A CI run's false verdict: 5.5 s without a step while the 2 cores were taken. Time
    during which tasks waited for a CPU is not silence, up to half of it: a hang is still
    found under full pressure, at twice the bound."""
    clock = FakeClock()
    pressure = [100.0]
    stall, _ = watch(clock, [3], pressure=pressure)
    stall.check(clock.now, late=False)  # the silence starts: pressure read at 100 s
    for _ in range(22):  # 5.5 s, every second of it under pressure
        clock.now += 0.25
        pressure[0] += 0.25
        assert stall.check(clock.now, late=False) is None
    reason = None
    while reason is None and clock.now < 1000 + 6.6:
        clock.now += 0.25
        pressure[0] += 0.25
        reason = stall.check(clock.now, late=False)
    assert reason is not None and clock.now >= 1000 + 6.25, clock.now - 1000
    assert "3.2 s of it with tasks waiting for a CPU" in reason, reason


def test_pressure_before_the_silence_is_not_counted() -> None:
    clock = FakeClock()
    pressure = [0.0]
    stall, steps = watch(clock, [1], pressure=pressure)
    steps.stepped(busy=True)
    pressure[0] = 50.0  # waited before the last step the checks saw
    stall.check(clock.now, late=False)
    clock.now += 3.25
    assert stall.check(clock.now, late=False) is None
    clock.now += 0.25
    assert stall.check(clock.now, late=False) is not None


def test_cpu_pressure_is_read_from_psi(tmp_path: Path) -> None:
    psi = tmp_path / "cpu"
    psi.write_text("some avg10=1.00 avg60=2.46 avg300=31.28 total=11238546136\n"
                   "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert cpu_pressure(psi) == pytest.approx(11238.546136)
    assert cpu_pressure(tmp_path / "absent") == 0.0


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
