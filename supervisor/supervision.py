"""One worker's supervision: start it (restored or cold), watch it until it exits, decide
what its exit means (restart with backoff, give up, stop), and the pure verdict of each
/health poll (`poll_verdict`), unit-tested without processes.

The supervisor runs `supervise(handle, service)` as one observed task per worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from dynamo_vllm.contract import journal
from dynamo_vllm.contract.config import Config
from dynamo_vllm.contract.discovery.backends import DiscoveryBackend
from dynamo_vllm.contract.protocol import ExitCode, Route, WorkerState
from dynamo_vllm.supervisor import http_client
from dynamo_vllm.supervisor.checkpoint.criu import CheckpointError
from dynamo_vllm.supervisor.phases import Phase, RestartReason
from dynamo_vllm.supervisor.restart_policy import NO_RESTART, restart_reason
from dynamo_vllm.supervisor.workers import WorkerHandle

if TYPE_CHECKING:
    from dynamo_vllm.supervisor.checkpoint.coordinator import CheckpointCoordinator
    from dynamo_vllm.supervisor.metrics import SupervisorMetrics

log = logging.getLogger(__name__)

# A worker being restored or dumped is polled this often, so that serving is seen at once.
CLOSE_POLL_S = 0.2
# The worker resumes by itself after checkpoint.timeout; this much more and it is stuck.
CHECKPOINT_SLACK_S = 60.0
# A cold worker binds its port and answers /health once vLLM is imported, before the model
# loads (~15 s on 2 busy cores); one silent this long after its spawn is stuck before that,
# and only a new life helps. start_timeout if lower. (Seen: a worker whose torch import
# waited on another worker's busy core for minutes, now kept off by agent's own CPUs.)
FIRST_ANSWER_S = 90.0


class Service(Protocol):
    """What a worker's supervision needs of the supervisor."""

    config: Config
    chrek: CheckpointCoordinator | None
    metrics: SupervisorMetrics
    discovery: DiscoveryBackend

    @property
    def stopping(self) -> bool: ...

    async def pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less when the service stops."""


# ---------------------------------------------------------------- the pure verdict

@dataclass(frozen=True)
class PollView:
    """What a poll verdict needs to know of a worker."""

    poll_failures: int
    ending: bool
    loading: bool
    in_checkpoint: bool
    started_at: float | None
    state_since: float
    unanswered: bool = False
    """Spawned cold and has not answered /health yet this life."""


@dataclass(frozen=True)
class PollLimits:
    poll_failures: int
    stop_timeout: float
    start_timeout: float
    checkpoint_timeout: float

    @classmethod
    def of(cls, config: Config) -> PollLimits:
        return cls(poll_failures=config.health.poll_failures,
                   stop_timeout=config.workers.stop_timeout,
                   start_timeout=config.workers.start_timeout,
                   checkpoint_timeout=config.checkpoint.timeout + CHECKPOINT_SLACK_S)


def poll_verdict(now: float, view: PollView, limits: PollLimits) -> RestartReason | None:
    """Why the worker must be killed now, or None."""
    if view.poll_failures >= limits.poll_failures:
        return RestartReason.WORKER_HUNG
    if view.ending and now - view.state_since > limits.stop_timeout:
        return RestartReason.STOP_TIMEOUT
    if view.loading and view.started_at is not None \
            and now - view.started_at > limits.start_timeout:
        return RestartReason.START_TIMEOUT
    if view.unanswered and view.started_at is not None \
            and now - view.started_at > min(limits.start_timeout, FIRST_ANSWER_S):
        return RestartReason.START_TIMEOUT
    if view.in_checkpoint and now - view.state_since > limits.checkpoint_timeout:
        return RestartReason.CHECKPOINT_TIMEOUT
    return None


def unanswered_is_expected(handle: WorkerHandle, refused: bool) -> bool:
    """A poll without an answer that does not count as a failure: before the port is bound
    (connection refused while starting), while it says it is ending (stop_timeout bounds
    it), while CRIU freezes it (checkpoint_timeout bounds it)."""
    starting = handle.phase in (Phase.STARTING, Phase.RESTORING)
    return handle.ending or handle.in_checkpoint or (refused and starting)


def view_of(handle: WorkerHandle) -> PollView:
    return PollView(poll_failures=handle.poll_failures, ending=handle.ending,
                    loading=handle.loading, in_checkpoint=handle.in_checkpoint,
                    started_at=handle.started_at, state_since=handle.state_since,
                    unanswered=handle.phase is Phase.STARTING)


# ---------------------------------------------------------------- the loop

async def supervise(handle: WorkerHandle, service: Service) -> None:
    """Start, watch and restart one worker until the service stops, the worker is asked to
    stop, or it is given up."""
    while not service.stopping and not handle.stop_requested:
        delay = handle.policy.next_delay()
        if delay > 0:
            handle.backing_off()
            log.info("worker %s restarts in %.1f s", handle.name, delay)
            await service.pause(delay)
            if service.stopping or handle.stop_requested:
                break
        try:
            await start(handle, service)
        except OSError as exc:
            handle.give_up(f"cannot start: {exc}")
            log.error("worker %s cannot start: %s", handle.name, exc)
            return
        code, killed_for = await watch(handle, service)
        handle.exited(code, ExitCode.describe(code))
        await handle.clean_up_group()
        handle.release_shm()
        handle.drop_metrics_dir()
        await handle.drop_discovery_record(service.discovery)
        if not _carry_on(handle, service, code, killed_for):
            return
    if handle.phase in (Phase.EXITED, Phase.BACKOFF):
        handle.stopped()


def _carry_on(handle: WorkerHandle, service: Service, code: int | None,
              killed_for: RestartReason | None) -> bool:
    """After an exit: True to start the worker again, False when it is stopped or given up."""
    if service.stopping or handle.stop_requested:
        handle.stopped()
        return False
    if handle.take_restart_request():
        log.info("worker %s restarting on request", handle.name,
                 extra=journal.fields(handle.name, code, "request"))
        return True
    if code == ExitCode.CHECKPOINTED and service.chrek is not None and killed_for is None:
        log.info("worker %s ended after its checkpoint; starting it again", handle.name,
                 extra=journal.fields(handle.name, code, "checkpointed"))
        return True
    if code in NO_RESTART and killed_for is None:
        handle.give_up(f"{NO_RESTART[ExitCode(code)]} (exit {code}); see the log")
        log.error("worker %s will not be restarted: %s", handle.name, handle.failed_reason,
                  extra=journal.fields(handle.name, code, "not_restartable"))
        return False
    reason = restart_reason(code, killed_for)
    handle.policy.record_failure()
    if handle.policy.crash_looping:
        handle.give_up(f"crash loop ({handle.policy.recent_failures} failures in "
                       f"{service.config.workers.crash_loop_window:g} s), last: "
                       f"{handle.last_exit}")
        log.error("worker %s given up: %s", handle.name, handle.failed_reason,
                  extra=journal.fields(handle.name, code, "crash_loop"))
        return False
    handle.restarting(reason)
    service.metrics.restarts.labels(worker=handle.name, reason=reason.value).inc()
    log.warning("worker %s ended (%s); restarting (reason %s)", handle.name, handle.last_exit,
                reason.value, extra=journal.fields(handle.name, code, reason.value))
    return True


async def start(handle: WorkerHandle, service: Service) -> None:
    """Restore the worker from its checkpoint when there is one, else spawn it cold."""
    chrek = service.chrek
    extra_env: dict[str, str] = {}
    if chrek is not None:
        if chrek.can_restore(handle.spec):
            try:
                await chrek.restore(handle)
                chrek.started(handle)
                return
            except CheckpointError as exc:
                chrek.restore_failed(handle, exc)
                await handle.clean_up_group(grace=2.0)
        extra_env = chrek.spawn_env(handle.spec)
    await handle.spawn(dict(os.environ), extra_env)
    if chrek is not None:
        chrek.started(handle)


async def watch(handle: WorkerHandle,
                service: Service) -> tuple[int | None, RestartReason | None]:
    """Until the worker exits: poll /health, kill it if hung or too slow to start."""
    assert handle.proc is not None
    exited = asyncio.ensure_future(handle.proc.wait())
    killed_for: RestartReason | None = None
    while True:
        interval = service.config.health.poll_interval
        if handle.phase is Phase.RESTORING or handle.in_checkpoint:
            interval = min(interval, CLOSE_POLL_S)
        done, _ = await asyncio.wait({exited}, timeout=interval)
        if done:
            return exited.result(), killed_for
        if killed_for or handle.phase is Phase.STOPPING:
            continue
        verdict = await poll(handle, service)
        if verdict is not None:
            killed_for = verdict
            silent = " (no /health answer since its start)" \
                if handle.phase is Phase.STARTING else ""
            log.error("worker %s: %s%s; killing its process group", handle.name,
                      verdict.value, silent, extra=journal.fields(handle.name,
                                                                  reason=verdict.value))
            handle.kill_group()


async def poll(handle: WorkerHandle, service: Service) -> RestartReason | None:
    """One /health poll. Returns why the worker must be killed, or None."""
    health = service.config.health
    try:
        code, body = await http_client.get_json(handle.spec.host, handle.spec.port,
                                                Route.HEALTH, health.poll_timeout)
    except http_client.LocalExhaustion as exc:
        log.warning("worker %s: cannot poll /health, the supervisor itself is short of "
                    "resources (%s); not counted against the worker", handle.name, exc)
    except (TimeoutError, http_client.PollError) as exc:
        refused = isinstance(exc, http_client.PollError)
        if not unanswered_is_expected(handle, refused):
            handle.poll_failed()
            log.warning("worker %s: /health did not answer (%d/%d): %s", handle.name,
                        handle.poll_failures, health.poll_failures, str(exc) or "timed out")
    else:
        _observed(handle, service, _reported_state(body), code == 200,
                  body if isinstance(body, dict) else None)
    return poll_verdict(time.monotonic(), view_of(handle), PollLimits.of(service.config))


def _reported_state(body: object) -> WorkerState | None:
    if not isinstance(body, dict):
        return None
    try:
        return WorkerState(str(body.get("state")))
    except ValueError:
        return None


def _observed(handle: WorkerHandle, service: Service, state: WorkerState | None, ok: bool,
              body: dict[str, object] | None) -> None:
    if handle.observed(state, ok, body):
        if service.chrek is not None:
            service.chrek.serving(handle)
        if handle.started_at is not None:
            service.metrics.start_seconds.labels(worker=handle.name).set(
                time.monotonic() - handle.started_at)
        log.info("worker %s serving on port %d", handle.name, handle.spec.port,
                 extra=journal.fields(handle.name))
    if handle.serving:
        handle.sample_shm()
