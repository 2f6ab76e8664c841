"""Every task the supervisor starts is observed: when one ends with an exception, its
traceback is logged and a handler decides what the failure means (give that worker up, stop
the service). Nothing ends silently in a `gather(..., return_exceptions=True)`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

OnFailure = Callable[[BaseException], None]


def observed(coro: Coroutine[Any, Any, T], name: str, on_failure: OnFailure | None = None
             ) -> asyncio.Task[T]:
    """Start `coro` as a task whose exception is logged with its traceback and handed to
    `on_failure` (cancellation is not a failure)."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    task.add_done_callback(lambda done: _report(done, on_failure))
    return task


def _report(task: asyncio.Task[Any], on_failure: OnFailure | None) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None:
        return
    log.error("task %s failed: %s: %s", task.get_name(), type(exc).__name__, exc,
              exc_info=(type(exc), exc, exc.__traceback__))
    if on_failure is not None:
        try:
            on_failure(exc)
        except Exception:
            log.exception("handling the failure of task %s failed", task.get_name())
