"""What the supervisor says of itself: the `STATUS=` line (also /status' `status`), in words,
and the /status document. Pure functions of the workers and the time."""

from __future__ import annotations

import os
from typing import Any

from dynamo_vllm.contract.config import Config
from dynamo_vllm.contract.protocol import WorkerState
from dynamo_vllm.supervisor.phases import Phase
from dynamo_vllm.supervisor.workers import WorkerHandle

# How long a checkpoint/restore event stays in STATUS=.
EVENT_SHOWN_S = 300.0


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def ago(seconds: float) -> str:
    return f"{duration(seconds)} ago"


def status_text(handles: list[WorkerHandle], now: float,
                event: tuple[str, float] | None = None) -> str:
    """One line: how many serve, who sleeps, loads, restores, is given up or restarting,
    the last restart and the last checkpoint event (`(text, when)`)."""
    serving = sum(1 for h in handles if h.serving)
    parts = [f"{serving}/{len(handles)} workers serving"]
    sleeping = [h.name for h in handles
                if h.phase is Phase.RUNNING and h.reported is WorkerState.SLEEPING]
    if sleeping:
        parts.append(f"asleep: worker {', '.join(sleeping)}")
    for h in handles:
        if h.phase is Phase.RESTORING or h.in_checkpoint:
            parts.append(f"worker {h.name} {h.state} ({now - h.state_since:.0f} s)")
        elif h.loading and h.started_at:
            parts.append(f"worker {h.name} loading ({now - h.started_at:.0f} s)")
        elif h.phase is Phase.FAILED:
            parts.append(f"worker {h.name} given up: {h.failed_reason}")
        elif h.phase is Phase.BACKOFF:
            parts.append(f"worker {h.name} restarting: {h.last_restart_reason}")
    recent = [h for h in handles if h.last_restart_at is not None and h.phase is not Phase.FAILED]
    if recent:
        last = max(recent, key=lambda h: h.last_restart_at or 0.0)
        parts.append(f"worker {last.name} restarted {ago(now - (last.last_restart_at or now))}"
                     f": {last.last_restart_reason}")
    if event is not None and event[0] and now - event[1] < EVENT_SHOWN_S:
        parts.append(event[0])
    return "; ".join(parts)


def status_document(config: Config, handles: list[WorkerHandle], text: str, ready: bool,
                    now: float, watchdog: dict[str, Any],
                    checkpoint: dict[str, Any] | None) -> dict[str, Any]:
    """GET /status."""
    return {
        "instance": config.served_name,
        "model": config.model.path,
        "pid": os.getpid(),
        "ready": ready,
        "status": text,
        "min_ready": config.min_ready,
        "watchdog": watchdog,
        "workers": [h.as_dict(now) for h in handles],
        "checkpoint": checkpoint,
    }
