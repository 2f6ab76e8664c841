"""Ending the engine's processes within a bound, from any thread.

vLLM's `AsyncLLM.shutdown()` can block on a hung EngineCore. Dynamo bounds it with
SIGALRM, which works only on the main thread; here the shutdown runs in a daemon thread
that is joined with a timeout, and whatever outlives it is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable

import psutil

log = logging.getLogger(__name__)


def descendants() -> list[psutil.Process]:
    """This process's descendants that hold engine resources: all but multiprocessing's
    resource tracker. The tracker ignores SIGTERM (so a stop had to SIGKILL it and warned on
    every clean stop), holds no memory of the engine's, and exits by itself once this
    process is gone, after unlinking any shared memory still registered: killing it would
    leak that instead."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    return [child for child in children if not _is_resource_tracker(child)]


def _is_resource_tracker(proc: psutil.Process) -> bool:
    try:
        return "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def kill_all(processes: list[psutil.Process], grace: float = 2.0) -> list[int]:
    """SIGTERM, wait up to `grace`, then SIGKILL. Returns the pids that had to be killed."""
    alive = [p for p in processes if _running(p)]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, still = psutil.wait_procs(alive, timeout=grace)
    for proc in still:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(still, timeout=grace)
    return [p.pid for p in still]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def call_bounded(fn: Callable[[], object], timeout: float, what: str) -> bool:
    """Run `fn` in a daemon thread; False if it failed or was still running after `timeout`."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # reported below, never lost in the thread
            outcome.append(exc)

    thread = threading.Thread(target=target, name=f"bounded-{what}", daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(timeout if timeout > 0 else None)
    if thread.is_alive():
        log.error("%s did not finish within %.0f s", what, timeout)
        return False
    if outcome and outcome[0] is not None:
        log.warning("%s failed: %s", what, outcome[0])
        return False
    log.info("%s took %.1f s", what, time.monotonic() - started)
    return True


async def stop_output_handler(engine: object) -> None:
    """Cancel AsyncLLM's output handler before the engine stops. vLLM's own shutdown stops
    EngineCore first and cancels the handler after, so on every clean stop the handler
    first saw the engine gone and logged an ERROR traceback (EngineDeadError) for a death
    that was the plan."""
    handler = getattr(engine, "output_handler", None)
    if isinstance(handler, asyncio.Task) and not handler.done():
        handler.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(handler, 5.0)


def shutdown_engine(engine: object, timeout: float) -> None:
    """Shut the engine down within `timeout`, then kill any process of ours left over."""
    children = descendants()
    shutdown = getattr(engine, "shutdown", None)
    if shutdown is not None:
        call_bounded(shutdown, timeout, "engine shutdown")
    killed = kill_all(children + descendants())
    if killed:
        log.warning("killed engine processes left after shutdown: %s", killed)
