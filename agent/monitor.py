"""The engine monitor: vLLM's `check_health()` on a timer, with a timeout on each check.

As Dynamo's `engine_monitor.py`: an `EngineDeadError` or a check that times out ends the
worker with `ExitCode.ENGINE_DEAD`. Unlike it, an unexpected exception is logged and
monitoring goes on; it never ends silently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from dynamo_vllm.contract.protocol import ExitCode

log = logging.getLogger(__name__)

FailureHandler = Callable[[ExitCode, str], None]


class EngineMonitor:
    def __init__(self, engine: Any, interval: float, check_timeout: float,
                 on_failure: FailureHandler, dead_errors: tuple[type[BaseException], ...]):
        self.engine = engine
        self.interval = interval
        self.check_timeout = check_timeout
        self.on_failure = on_failure
        self.dead_errors = dead_errors
        self.checks = 0
        self.unexpected_errors = 0

    async def run(self) -> None:
        if self.interval <= 0:
            log.warning("engine health checks are disabled (health.interval = 0)")
            return
        timeout = self.check_timeout if self.check_timeout > 0 else None
        while True:
            try:
                await asyncio.wait_for(self.engine.check_health(), timeout)
                self.checks += 1
            except self.dead_errors as exc:
                self.on_failure(ExitCode.ENGINE_DEAD, f"engine dead: {exc}")
                return
            except TimeoutError:
                self.on_failure(ExitCode.ENGINE_DEAD,
                                f"engine health check timed out after {self.check_timeout:g} s")
                return
            except Exception:
                self.unexpected_errors += 1
                log.exception("engine health check raised unexpectedly; monitoring goes on")
            await asyncio.sleep(self.interval)


class EngineErrorHook:
    """Stands in for the server in vLLM's error handlers.

    When a request fails because the engine died, vLLM sets `server.should_exit`. Here that
    ends the worker with the engine-dead code at once, instead of stopping the HTTP server
    behind the worker's back.
    """

    def __init__(self, ending: Callable[[], bool], fail: FailureHandler):
        self._ending = ending
        self._fail = fail

    @property
    def should_exit(self) -> bool:
        return self._ending()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self._fail(ExitCode.ENGINE_DEAD, "engine dead (a request failed with "
                                             "EngineDeadError)")
