"""The supervisor's view of a worker's life: its phases and the moves between them, and the
words it keeps for why a life ended. Pure data, no processes.

A phase is what the supervisor did (spawned, restored, stopping...). What the worker says
of itself on GET /health (`contract.protocol.WorkerState`) is kept apart, as the handle's
`reported` state, and only read while the worker runs.
"""

from __future__ import annotations

import enum


class Phase(enum.StrEnum):
    STOPPED = "stopped"
    """Not running and not wanted to (yet): before the first start, after a stop."""
    BACKOFF = "backoff"
    """Waiting out the restart delay after a failure."""
    STARTING = "starting"
    """Spawned cold; /health has not answered yet."""
    RESTORING = "restoring"
    """Brought back by CRIU; /health has not answered yet."""
    RUNNING = "running"
    """/health answers: what the worker says is in `reported` (loading, serving...)."""
    STOPPING = "stopping"
    """Asked to stop (SIGTERM), waiting for it to exit."""
    EXITED = "exited"
    """The process ended; its group and files are being cleaned up, the next move decided."""
    FAILED = "failed"
    """Given up: a crash loop, a bad config, a start that cannot work. A reload retries."""


# Allowed moves, from -> to. Anything else is a bug in the supervisor.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.STOPPED: frozenset({Phase.STARTING, Phase.RESTORING, Phase.BACKOFF, Phase.FAILED}),
    Phase.BACKOFF: frozenset({Phase.STARTING, Phase.RESTORING, Phase.STOPPED, Phase.FAILED}),
    Phase.STARTING: frozenset({Phase.RUNNING, Phase.STOPPING, Phase.EXITED}),
    Phase.RESTORING: frozenset({Phase.RUNNING, Phase.STOPPING, Phase.EXITED}),
    Phase.RUNNING: frozenset({Phase.STOPPING, Phase.EXITED}),
    Phase.STOPPING: frozenset({Phase.EXITED}),
    Phase.EXITED: frozenset({Phase.STOPPED, Phase.BACKOFF, Phase.STARTING, Phase.RESTORING,
                             Phase.FAILED}),
    Phase.FAILED: frozenset({Phase.STOPPED}),
}

# A process runs in these phases (spawned or restored, not yet reaped).
LIVE = frozenset({Phase.STARTING, Phase.RESTORING, Phase.RUNNING, Phase.STOPPING})


class IllegalTransition(AssertionError):
    """A move the table does not allow: a bug, logged with its traceback by the task's
    done-callback (as supervisord's `_assertInState`)."""


def check_transition(worker: str, current: Phase, new: Phase) -> None:
    if new is not current and new not in TRANSITIONS[current]:
        raise IllegalTransition(f"worker {worker}: {current.value} -> {new.value} is not an "
                                f"allowed transition")


class RestartReason(enum.StrEnum):
    """The `reason` label of dynamo_agent_worker_restarts_total: why a life ended."""

    ENGINE_DEAD = "engine_dead"
    ENGINE_HUNG = "engine_hung"
    START_FAILED = "start_failed"
    WORKER_HUNG = "worker_hung"
    START_TIMEOUT = "start_timeout"
    STOP_TIMEOUT = "stop_timeout"
    CHECKPOINT_TIMEOUT = "checkpoint_timeout"
    EXITED = "exited"
    CRASHED = "crashed"
    KILLED = "killed"
    UNKNOWN = "unknown"

