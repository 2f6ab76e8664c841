"""When to restart a worker, and when to give up on it (pure logic, no processes)."""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dynamo_vllm.contract.protocol import ExitCode
from dynamo_vllm.contract.settings import WorkersSection
from dynamo_vllm.supervisor.phases import RestartReason

# Exit codes after which restarting cannot help, or was not wanted.
NO_RESTART = {ExitCode.CONFIG: "bad config", ExitCode.CHECKPOINTED: "checkpoint taken"}


def restart_reason(exit_code: int | None,
                   killed_for: RestartReason | None = None) -> RestartReason:
    """Why the last life of a worker ended, as the `reason` label of its restart."""
    if killed_for:
        return killed_for
    if exit_code is None:
        return RestartReason.UNKNOWN
    if exit_code == ExitCode.ENGINE_DEAD:
        return RestartReason.ENGINE_DEAD
    if exit_code == ExitCode.UNHEALTHY:
        return RestartReason.ENGINE_HUNG
    if exit_code == ExitCode.START_FAILED:
        return RestartReason.START_FAILED
    if exit_code == ExitCode.STOPPED:
        # The supervisor did not ask: an exit that says "fine" is still a failure.
        return RestartReason.EXITED
    if exit_code < 0:
        return RestartReason.KILLED
    return RestartReason.CRASHED


@dataclass
class RestartPolicy:
    """Exponential backoff with jitter, and crash-loop detection over a sliding window."""

    initial: float = 1.0
    maximum: float = 60.0
    max_restarts: int = 5
    window: float = 300.0
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    _recent: deque[float] = field(default_factory=deque)
    _failures_in_a_row: int = 0

    @classmethod
    def of(cls, workers: WorkersSection) -> RestartPolicy:
        return cls(initial=workers.restart_backoff, maximum=workers.restart_backoff_max,
                   max_restarts=workers.crash_loop_restarts, window=workers.crash_loop_window)

    def retune(self, workers: WorkersSection) -> None:
        """New limits from a reloaded config; the failures seen so far still count."""
        self.initial, self.maximum = workers.restart_backoff, workers.restart_backoff_max
        self.max_restarts, self.window = workers.crash_loop_restarts, workers.crash_loop_window

    def record_failure(self) -> None:
        now = self.clock()
        self._recent.append(now)
        while self._recent and now - self._recent[0] > self.window:
            self._recent.popleft()
        self._failures_in_a_row += 1

    def record_success(self) -> None:
        """The worker served: the next failure starts the backoff afresh."""
        self._failures_in_a_row = 0

    @property
    def crash_looping(self) -> bool:
        now = self.clock()
        return sum(1 for t in self._recent if now - t <= self.window) > self.max_restarts

    @property
    def recent_failures(self) -> int:
        return len(self._recent)

    def next_delay(self) -> float:
        """Seconds to wait before the next start: doubling, capped, with ±20% jitter."""
        if self._failures_in_a_row <= 0:
            return 0.0
        base = min(self.maximum, self.initial * 2 ** (self._failures_in_a_row - 1))
        return max(0.0, base * self.rng.uniform(0.8, 1.2))
