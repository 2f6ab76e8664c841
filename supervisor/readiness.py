"""What the supervisor tells systemd, decided from what it sees: READY=1, WATCHDOG=1, or stop.

A pure function of the time, the workers' states, the settings and what was sent before,
so that every branch is unit-tested without processes (tests/unit/test_readiness.py):

- READY=1 once, when at least `min_ready` workers are available (serving, or asleep on
  an operator's request), and the frontend serves where there is one;
- WATCHDOG=1 while ready, while starting (some worker can still come up), or while below
  `min_ready` for less than `unready_grace` after the first READY (or after a reload's roll
  ends): then systemd's watchdog restarts the unit;
- stop with SERVICE_FAILED when every worker was given up (CONFIG when each was given up for
  its config), when the frontend was given up, or when the service is unhealthy and no
  systemd watchdog would act.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dynamo_vllm.contract.protocol import ExitCode


@dataclass(frozen=True)
class WorkerView:
    """What readiness needs to know of one worker."""

    available: bool
    serving: bool
    failed: bool = False
    failed_for_config: bool = False


@dataclass(frozen=True)
class FrontendView:
    """The node's front door ([frontend] enabled): readiness waits for it too."""

    serving: bool
    failed: bool = False


@dataclass(frozen=True)
class Sent:
    """What has been said so far: the policy's memory between ticks."""

    ready_sent: bool = False
    unready_since: float | None = None


@dataclass(frozen=True)
class Settings:
    min_ready: int
    unready_grace: float
    watchdog: bool
    """A systemd watchdog is armed (WATCHDOG_USEC): it acts when pings stop."""
    rolling: bool = False
    """A reload restarts the workers one at a time: being short of `min_ready` is planned."""


@dataclass(frozen=True)
class Verdict:
    ready: bool
    serving: int
    send_ready: bool
    """Send READY=1 now (the first time the service is ready)."""
    healthy: bool
    """WATCHDOG=1 may be sent: ready, or recovering within its budget."""
    became_unready: bool
    """It was ready and is no longer: worth a warning."""
    exit_code: ExitCode | None
    """Stop the service with this code (None: keep going)."""
    exit_reason: str
    all_failed: bool
    """Every worker was given up."""
    sent: Sent


def readiness(now: float, workers: list[WorkerView], settings: Settings, sent: Sent,
              frontend: FrontendView | None = None) -> Verdict:
    serving = sum(1 for w in workers if w.serving)
    # A worker asleep on purpose is not a failure: it counts towards min_ready.
    ready = sum(1 for w in workers if w.available) >= settings.min_ready
    if frontend is not None:
        # With a front door, clients come through it: not ready until it serves.
        ready = ready and frontend.serving
    send_ready = became_unready = False
    if ready:
        send_ready = not sent.ready_sent
        sent = Sent(ready_sent=True, unready_since=None)
    elif sent.unready_since is None:
        became_unready = sent.ready_sent
        sent = replace(sent, unready_since=now)

    if ready:
        healthy = True
    elif not sent.ready_sent:
        # Starting: healthy while some worker can still come up within its start time.
        healthy = any(not w.failed for w in workers) and not (frontend and frontend.failed)
    else:
        if settings.rolling:
            # On purpose, and bounded by each worker's start_timeout: the grace starts
            # when the roll ends, so a roll under load never costs the unit a restart.
            sent = replace(sent, unready_since=now)
        since = sent.unready_since if sent.unready_since is not None else now
        healthy = now - since < settings.unready_grace

    exit_code: ExitCode | None = None
    exit_reason = ""
    all_failed = bool(workers) and all(w.failed for w in workers)
    if all_failed:
        bad_config = all(w.failed_for_config for w in workers)
        exit_code = ExitCode.CONFIG if bad_config else ExitCode.SERVICE_FAILED
        exit_reason = "every worker failed"
    elif frontend is not None and frontend.failed:
        exit_code = ExitCode.SERVICE_FAILED
        exit_reason = "the frontend was given up"
    elif not healthy and not settings.watchdog:
        # No systemd watchdog to take over: exit so that Restart= does.
        exit_code = ExitCode.SERVICE_FAILED
        exit_reason = (f"fewer than {settings.min_ready} workers serving for more than "
                       f"{settings.unready_grace:g} s")
    return Verdict(ready=ready, serving=serving, send_ready=send_ready, healthy=healthy,
                   became_unready=became_unready, exit_code=exit_code,
                   exit_reason=exit_reason, all_failed=all_failed, sent=sent)
