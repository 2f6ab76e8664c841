"""The worker's own view of itself: its state, why, and when the engine last made progress."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from dynamo_vllm.contract.protocol import WORKER_TRANSITIONS, WorkerState

log = logging.getLogger(__name__)


@dataclass
class WorkerStatus:
    """Shared by the HTTP layer, the monitor, the canary and the stat logger (one event loop).

    `last_progress` is a monotonic time: the engine produced output or finished a step. The
    canary uses it to tell an idle engine from a hung one, so requests that never finish do
    not hide a hang.
    """

    state: WorkerState = WorkerState.LOADING
    reason: str = "loading the model"
    since: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    canary_failures: int = 0
    started_at: float = field(default_factory=time.time)

    def set(self, state: WorkerState, reason: str) -> None:
        if state is not self.state and state not in WORKER_TRANSITIONS[self.state]:
            # A bug: the move is made (the state must say what the worker does), and logged.
            log.error("bug: worker state %s -> %s is not an allowed transition (%s)",
                      self.state.value, state.value, reason, stack_info=True)
        if state != self.state or reason != self.reason:
            log.info("worker state %s -> %s: %s", self.state.value, state.value, reason)
        if state != self.state:
            self.since = time.monotonic()
        self.state = state
        self.reason = reason

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self.last_progress

    @property
    def serving(self) -> bool:
        return self.state is WorkerState.SERVING

    def as_dict(self) -> dict[str, object]:
        return {
            "state": self.state.value,
            "reason": self.reason,
            "state_for_s": round(time.monotonic() - self.since, 3),
            "idle_for_s": round(self.idle_for(), 3),
            "canary_failures": self.canary_failures,
            "started_at": self.started_at,
        }
