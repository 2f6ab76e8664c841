"""A hung engine with work in flight: no step for longer than the engine's own steps take.

The canary finds a hang when the engine is idle, but only after `canary_idle` seconds and
its retries. With requests in flight a working engine sends its output every step, so a
silence much longer than its recent steps means it is stuck: the bound is `stall_factor`
times the p99 of the recent step times (learned while busy), never under `stall_floor`.
An idle engine makes no steps and is never judged here; the canary's request is work in
flight, so an idle hang is found `stall_floor` seconds after the canary is sent.

A step is seen by the stat logger in the API process's event loop; the watch runs on the
same loop. A loop that was blocked (a long tokenisation, a GC pause, a CPU taken by other
processes) delays both, so a check that wakes late is not trusted, and a verdict needs two
checks in a row past the bound.

The engine's own processes can be starved while the loop is not: a CI run saw EngineCore
make no step for 5.5 s while another worker was being restored beside two test groups on 2
cores, and a healthy engine was killed. So the time during the silence that some task of the
machine waited for a CPU (the kernel's pressure stall information, /proc/pressure/cpu, "some")
does not count as silence, up to half of it: on a machine whose CPUs are always taken a hang
is still found, at up to twice the bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from dynamo_vllm.agent.monitor import FailureHandler
from dynamo_vllm.agent.status import WorkerStatus
from dynamo_vllm.contract.protocol import ExitCode

log = logging.getLogger(__name__)

CHECK_EVERY_S = 0.25
# A check that wakes this much later than asked saw a blocked loop, not a silent engine.
LATE_CHECK_S = 0.5
STEP_SAMPLES = 1024
CPU_PRESSURE = Path("/proc/pressure/cpu")


def cpu_pressure(path: Path = CPU_PRESSURE) -> float:
    """Seconds that some task of the machine waited for a CPU since boot (PSI's "some"
    total); 0 where the kernel has no PSI, so that nothing is discounted there."""
    try:
        text = path.read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("some "):
            for field in line.split():
                if field.startswith("total="):
                    return int(field[len("total="):]) / 1e6
    return 0.0


class StepTimes:
    """The engine's step times while it has requests, fed by the stat logger."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.last_step = clock()
        self._busy = False
        self._samples: deque[float] = deque(maxlen=STEP_SAMPLES)
        self._p99: float | None = None

    def stepped(self, busy: bool) -> None:
        """One engine step ended; `busy`: it left requests running or waiting."""
        now = self.clock()
        if self._busy:
            # The engine went straight on to this step: the gap is one step's time.
            self._samples.append(now - self.last_step)
            self._p99 = None
        self.last_step = now
        self._busy = busy

    def p99(self) -> float:
        if self._p99 is None:
            ordered = sorted(self._samples)
            self._p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] \
                if ordered else 0.0
        return self._p99


class StallWatch:
    def __init__(self, steps: StepTimes, inflight: Callable[[], int], status: WorkerStatus,
                 floor: float, factor: float, on_failure: FailureHandler,
                 pressure: Callable[[], float] = cpu_pressure):
        self.steps = steps
        self.inflight = inflight
        self.status = status
        self.floor = floor
        self.factor = factor
        self.on_failure = on_failure
        self.pressure = pressure
        self._active_since: float | None = None
        self._past_bound = 0
        # The last step a check saw, and the pressure read at that check (the silence's start).
        self._seen_step: float | None = None
        self._pressure_at_step = 0.0

    def bound(self) -> float:
        return max(self.floor, self.factor * self.steps.p99())

    def check(self, now: float, late: bool) -> str | None:
        """One look; the reason for a hung verdict, or None."""
        requests = self.inflight() if self.status.serving else 0
        if requests == 0:
            self._active_since = None
            self._past_bound = 0
            return None
        if self._active_since is None:
            self._active_since = now
        last = max(self.steps.last_step, self._active_since)
        if last != self._seen_step:
            self._seen_step, self._pressure_at_step = last, self.pressure()
        silent = now - last
        bound = self.bound()
        if silent <= bound or late:
            self._past_bound = 0
            return None
        starved = min(max(0.0, self.pressure() - self._pressure_at_step), silent / 2)
        if silent - starved <= bound:
            self._past_bound = 0
            return None
        self._past_bound += 1
        if self._past_bound < 2:
            return None
        return (f"engine hung: no step for {silent:.1f} s with {requests} request(s) in flight "
                f"({starved:.1f} s of it with tasks waiting for a CPU; bound {bound:.1f} s: "
                f"the larger of stall_floor and {self.factor:g} x the p99 step time "
                f"{self.steps.p99() * 1000:.0f} ms)")

    async def run(self) -> None:
        if self.floor <= 0:
            log.info("the stall check is off (health.stall_floor = 0); the canary alone "
                     "finds a hung engine")
            return
        clock = self.steps.clock
        while True:
            asked = clock() + CHECK_EVERY_S
            await asyncio.sleep(CHECK_EVERY_S)
            now = clock()
            reason = self.check(now, late=now - asked > LATE_CHECK_S)
            if reason is not None:
                self.on_failure(ExitCode.UNHEALTHY, reason)
                return


def engine_inflight(engine: object) -> Callable[[], int]:
    """Requests the engine has and has not finished, as the API process counts them
    (the canary's included)."""
    processor = getattr(engine, "output_processor", None)
    count = getattr(processor, "get_num_unfinished_requests", None)
    if count is None:
        return lambda: 0
    return lambda: int(count())
