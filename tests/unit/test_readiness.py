"""What the supervisor tells systemd (READY, WATCHDOG, stop), as a pure function."""

from __future__ import annotations

import pytest

from dynamo_vllm.contract.protocol import ExitCode
from dynamo_vllm.supervisor.readiness import Sent, Settings, WorkerView, readiness

SERVING = WorkerView(available=True, serving=True)
ASLEEP = WorkerView(available=True, serving=False)
LOADING = WorkerView(available=False, serving=False)
FAILED = WorkerView(available=False, serving=False, failed=True)
BAD_CONFIG = WorkerView(available=False, serving=False, failed=True, failed_for_config=True)

WATCHED = Settings(min_ready=2, unready_grace=60.0, watchdog=True)
UNWATCHED = Settings(min_ready=2, unready_grace=60.0, watchdog=False)


def test_ready_is_sent_once_when_min_ready_workers_are_available() -> None:
    first = readiness(0.0, [SERVING, LOADING], WATCHED, Sent())
    assert not first.ready and not first.send_ready and first.healthy
    second = readiness(1.0, [SERVING, SERVING], WATCHED, first.sent)
    assert second.ready and second.send_ready and second.serving == 2
    third = readiness(2.0, [SERVING, SERVING], WATCHED, second.sent)
    assert third.ready and not third.send_ready


def test_a_worker_asleep_on_purpose_counts_towards_min_ready() -> None:
    verdict = readiness(0.0, [SERVING, ASLEEP], WATCHED, Sent())
    assert verdict.ready and verdict.serving == 1


def test_starting_is_healthy_while_some_worker_can_still_come_up() -> None:
    assert readiness(500.0, [LOADING, FAILED], WATCHED, Sent()).healthy
    verdict = readiness(500.0, [FAILED, FAILED], WATCHED, Sent())
    assert verdict.exit_code is ExitCode.SERVICE_FAILED


def test_below_min_ready_after_ready_is_healthy_only_within_the_grace() -> None:
    sent = Sent(ready_sent=True)
    dropped = readiness(100.0, [SERVING, LOADING], WATCHED, sent)
    assert not dropped.ready and dropped.became_unready and dropped.healthy
    assert dropped.sent.unready_since == 100.0
    within = readiness(159.0, [SERVING, LOADING], WATCHED, dropped.sent)
    assert within.healthy and not within.became_unready
    past = readiness(161.0, [SERVING, LOADING], WATCHED, dropped.sent)
    assert not past.healthy
    assert past.exit_code is None  # the systemd watchdog acts: no WATCHDOG=1 is enough
    back = readiness(162.0, [SERVING, SERVING], WATCHED, past.sent)
    assert back.ready and back.healthy and back.sent.unready_since is None
    assert not back.send_ready  # READY=1 is sent once per life of the service


def test_without_a_watchdog_the_supervisor_exits_when_unhealthy() -> None:
    sent = Sent(ready_sent=True, unready_since=0.0)
    verdict = readiness(61.0, [SERVING, LOADING], UNWATCHED, sent)
    assert verdict.exit_code is ExitCode.SERVICE_FAILED
    assert "fewer than 2 workers serving" in verdict.exit_reason


@pytest.mark.parametrize(("workers", "code"), [
    ([BAD_CONFIG, BAD_CONFIG], ExitCode.CONFIG),
    ([BAD_CONFIG, FAILED], ExitCode.SERVICE_FAILED),
])
def test_every_worker_given_up_stops_the_service(workers: list[WorkerView],
                                                 code: ExitCode) -> None:
    verdict = readiness(0.0, workers, WATCHED, Sent(ready_sent=True))
    assert verdict.exit_code is code and verdict.all_failed
    assert verdict.exit_reason == "every worker failed"


def test_the_verdict_does_not_change_its_input() -> None:
    sent = Sent()
    readiness(0.0, [SERVING, SERVING], WATCHED, sent)
    assert sent == Sent()


def test_a_reloads_roll_is_short_on_purpose_and_the_grace_starts_when_it_ends() -> None:
    """A roll under load (each worker restarted in turn) may leave the service below
    min_ready for longer than the grace: found by a rolling reload through the frontend,
    where the unit without a watchdog stopped itself 120 s into the roll."""
    from dataclasses import replace

    rolling = replace(UNWATCHED, rolling=True)
    ready = readiness(0.0, [SERVING, SERVING], rolling, Sent())
    during = readiness(1.0, [SERVING, LOADING], rolling, ready.sent)
    late = readiness(500.0, [LOADING, SERVING], rolling, during.sent)
    assert late.healthy and late.exit_code is None and not late.ready
    # The roll ended with a worker still short: the grace counts from then.
    after = readiness(501.0, [LOADING, SERVING], UNWATCHED, late.sent)
    assert after.healthy
    assert readiness(560.0, [LOADING, SERVING], UNWATCHED, after.sent).exit_code \
        is ExitCode.SERVICE_FAILED
