"""An engine that fails to start: a restart may help (exit 7, retried and counted by the
crash-loop limit) unless the failure says the config must change (exit 78)."""

from __future__ import annotations

import pytest

from dynamo_vllm.agent.engine import EngineStartError, start_failure_reason
from dynamo_vllm.contract.protocol import ExitCode
from dynamo_vllm.supervisor.phases import RestartReason
from dynamo_vllm.supervisor.restart_policy import NO_RESTART, RestartPolicy, restart_reason


def kv_cache_too_small() -> BaseException:
    try:
        try:
            raise ValueError("To serve at least one request with the models's max seq len "
                             "(4096), (0.12 GiB KV cache is needed, which is larger than the "
                             "available KV cache memory (0.01 GiB).")
        except ValueError as inner:
            raise RuntimeError("Engine core initialization failed.") from inner
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize(("exc", "permanent"), [
    (kv_cache_too_small(), True),
    (RuntimeError("Engine core initialization failed. See root cause above."), False),
    (OSError("[Errno 16] Device or resource busy"), False),
])
def test_only_what_a_restart_cannot_fix_is_permanent(exc: BaseException,
                                                     permanent: bool) -> None:
    assert EngineStartError(start_failure_reason(exc)).permanent is permanent


def test_exit_7_is_retried_counted_and_never_a_config_error() -> None:
    assert ExitCode.START_FAILED == 7 and ExitCode.START_FAILED not in NO_RESTART
    assert ExitCode.describe(7) == "engine failed to start"
    assert restart_reason(ExitCode.START_FAILED) is RestartReason.START_FAILED
    policy = RestartPolicy(initial=1.0, max_restarts=2, window=60.0)
    for _ in range(3):
        policy.record_failure()
    assert policy.crash_looping and policy.next_delay() > 0
