"""The supervisor's worker state machine: every allowed move, a sample of refused ones, the
worker's reported state kept apart from the phase, and the pure /health poll verdict."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest

from dynamo_vllm.agent.status import WorkerStatus
from dynamo_vllm.contract.protocol import WORKER_TRANSITIONS, WorkerState
from dynamo_vllm.supervisor.phases import (
    TRANSITIONS,
    IllegalTransition,
    Phase,
    RestartReason,
    check_transition,
)
from dynamo_vllm.supervisor.restart_policy import RestartPolicy
from dynamo_vllm.supervisor.supervision import PollLimits, PollView, poll_verdict
from dynamo_vllm.supervisor.worker_process import WorkerSpec
from dynamo_vllm.supervisor.workers import WorkerHandle

ALLOWED = [(a, b) for a, targets in TRANSITIONS.items() for b in sorted(targets)]
REFUSED = [(a, b) for a, b in itertools.product(Phase, Phase)
           if a is not b and b not in TRANSITIONS[a]]


def handle(tmp_path: Path) -> WorkerHandle:
    spec = WorkerSpec(index=0, host="127.0.0.1", port=8100, gpus=[], cpus=[],
                      metrics_dir=tmp_path / "m", python="", config_path=tmp_path / "c")
    return WorkerHandle(spec=spec, policy=RestartPolicy())


@pytest.mark.parametrize(("current", "new"), ALLOWED)
def test_every_allowed_transition(current: Phase, new: Phase) -> None:
    check_transition("0", current, new)


def test_every_phase_has_a_way_out_and_every_phase_is_reachable() -> None:
    assert all(TRANSITIONS[p] for p in Phase)
    reachable = {Phase.STOPPED} | {b for _, b in ALLOWED}
    assert reachable == set(Phase)


@pytest.mark.parametrize(("current", "new"), REFUSED[::3])
def test_refused_transitions_raise(current: Phase, new: Phase) -> None:
    with pytest.raises(IllegalTransition, match=f"{current.value} -> {new.value}"):
        check_transition("0", current, new)


def test_a_handle_refuses_an_illegal_move_and_keeps_its_phase(tmp_path: Path) -> None:
    h = handle(tmp_path)
    with pytest.raises(IllegalTransition):
        h.stopping()  # nothing runs: STOPPED -> STOPPING is a bug
    assert h.phase is Phase.STOPPED
    with pytest.raises(IllegalTransition):
        h.exited(0, "stopped on request")
    assert h.phase is Phase.STOPPED


def test_a_life_through_the_handle(tmp_path: Path) -> None:
    h = handle(tmp_path)
    h.backing_off()
    h._move(Phase.STARTING)  # what spawn() does, without a process
    assert h.loading and h.state == "starting"
    assert not h.observed(WorkerState.LOADING, False, {"state": "loading"})
    assert h.phase is Phase.RUNNING and h.reported is WorkerState.LOADING
    assert h.state == "loading" and h.loading
    assert h.observed(WorkerState.SERVING, True, {"state": "serving"})
    assert h.serving and h.available and h.state == "serving"
    assert not h.observed(WorkerState.SERVING, True, {"state": "serving"})
    h.observed(WorkerState.SLEEPING, False, {"state": "sleeping"})
    assert h.available and not h.serving and h.phase is Phase.RUNNING
    assert h.observed(WorkerState.SERVING, True, {"state": "serving"})  # serving again
    h.observed(WorkerState.DEAD, False, {"state": "dead"})
    assert h.ending
    h.exited(3, "engine dead")
    assert h.state == "exited" and h.reported is WorkerState.DEAD  # kept, but not shown
    h.restarting(RestartReason.ENGINE_DEAD)
    assert h.restarts == {"engine_dead": 1} and h.last_restart_reason == "engine dead"
    h.give_up("crash loop")
    assert h.failed and h.state == "failed"
    h.retry(RestartPolicy())
    assert h.phase is Phase.STOPPED and h.failed_reason == ""


def test_a_poll_answer_while_stopping_never_moves_the_phase_back(tmp_path: Path) -> None:
    h = handle(tmp_path)
    h._move(Phase.STARTING)
    h.observed(WorkerState.SERVING, True, {})
    h.stopping()
    assert not h.observed(WorkerState.SERVING, True, {})
    assert h.phase is Phase.STOPPING and h.state == "stopping" and not h.serving


def test_an_answer_that_is_no_worker_state_only_resets_the_failures(tmp_path: Path) -> None:
    h = handle(tmp_path)
    h._move(Phase.STARTING)
    h.poll_failed()
    assert not h.observed(None, False, None)
    assert h.poll_failures == 0 and h.phase is Phase.STARTING


LIMITS = PollLimits(poll_failures=3, stop_timeout=90.0, start_timeout=900.0,
                    checkpoint_timeout=660.0)


def view(**changes: object) -> PollView:
    base = {"poll_failures": 0, "ending": False, "loading": False, "in_checkpoint": False,
            "started_at": 0.0, "state_since": 0.0}
    return PollView(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(("now", "changes", "verdict"), [
    (10.0, {}, None),
    (10.0, {"poll_failures": 2}, None),
    (10.0, {"poll_failures": 3}, RestartReason.WORKER_HUNG),
    (89.0, {"ending": True}, None),
    (91.0, {"ending": True}, RestartReason.STOP_TIMEOUT),
    (899.0, {"loading": True}, None),
    (901.0, {"loading": True}, RestartReason.START_TIMEOUT),
    (901.0, {"loading": False}, None),
    (659.0, {"in_checkpoint": True}, None),
    (661.0, {"in_checkpoint": True}, RestartReason.CHECKPOINT_TIMEOUT),
    # Silent since its spawn (never bound its port): a new life after FIRST_ANSWER_S.
    (89.0, {"loading": True, "unanswered": True}, None),
    (91.0, {"loading": True, "unanswered": True}, RestartReason.START_TIMEOUT),
    (91.0, {"loading": True, "unanswered": False}, None),
])
def test_poll_verdict(now: float, changes: dict[str, object],
                      verdict: RestartReason | None) -> None:
    assert poll_verdict(now, view(**changes), LIMITS) is verdict


def test_worker_states_allowed_and_refused(caplog: pytest.LogCaptureFixture) -> None:
    assert WorkerState.SERVING in WORKER_TRANSITIONS[WorkerState.LOADING]
    # A checkpoint on request: serving, asleep, then paused for the checkpointer.
    assert WorkerState.CHECKPOINT in WORKER_TRANSITIONS[WorkerState.SLEEPING]
    assert not WORKER_TRANSITIONS[WorkerState.DEAD]
    status = WorkerStatus()
    with caplog.at_level(logging.ERROR):
        status.set(WorkerState.SERVING, "serving")
        status.set(WorkerState.SLEEPING, "asleep")
        status.set(WorkerState.SERVING, "serving")
    assert not [r for r in caplog.records if "not an allowed transition" in r.getMessage()]
    status.set(WorkerState.DEAD, "engine died")
    with caplog.at_level(logging.ERROR):
        status.set(WorkerState.SERVING, "serving")  # a bug: logged, never silent
    assert [r for r in caplog.records if "dead -> serving is not an allowed transition"
            in r.getMessage()]
