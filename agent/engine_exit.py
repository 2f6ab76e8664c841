"""Seeing the engine's processes die the moment they do.

vLLM marks the engine dead from a thread that waits on its processes, and `check_health()`
reads that mark; polling it every `health.interval` put up to two seconds between a dead
EngineCore and a worker that says so. Here the event loop itself waits on each engine
process's sentinel (the pipe multiprocessing closes when the process ends), so `/health`
turns non-200 and the worker starts its exit in the same loop turn. The monitor's
`check_health()` poll stays as the second line: it also covers engines whose processes are
not ours to watch (in-process engines, Ray actors).

The sentinel is a pipe, so CRIU dumps and restores it with the process tree like any other.

EngineCore's own children, the vLLM Worker processes that run the model (one per GPU, and
one for the CPU engine), are not ours to wait on: EngineCore notices their death and ends
itself, but only after its own shutdown (1.6 s on the CPU engine). They are polled every
0.1 s (their state in /proc), which also holds across a restore, where CRIU gives them their
pids back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import psutil

from dynamo_vllm.contract.protocol import ExitCode

log = logging.getLogger(__name__)

FailureHandler = Callable[[ExitCode, str], None]


def engine_processes(engine: Any) -> list[Any]:
    """The multiprocessing processes behind `engine` (vLLM's `AsyncLLM`): EngineCore, one per
    data-parallel rank. Empty when vLLM keeps the engine in this process or elsewhere."""
    resources = getattr(getattr(engine, "engine_core", None), "resources", None)
    manager = getattr(resources, "engine_manager", None)
    processes = getattr(manager, "processes", None)
    return [p for p in processes or [] if _sentinel(p) is not None]


WORKER_POLL_S = 0.1
# vLLM names its model-running processes so (the comm name, truncated to 15 characters).
VLLM_WORKER_NAME = "VLLM::Worker"


def vllm_workers(processes: list[Any]) -> list[psutil.Process]:
    """The vLLM Worker processes below these EngineCore processes."""
    found = []
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children():
                with contextlib.suppress(psutil.Error):
                    if child.name().startswith(VLLM_WORKER_NAME):
                        found.append(child)
    return found


def _gone(proc: psutil.Process) -> bool:
    # The pid's state only, not psutil's is_running(): that compares start times, and a
    # process CRIU restored has a new one.
    try:
        return proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return True


def _sentinel(proc: Any) -> int | None:
    try:
        sentinel = proc.sentinel
    except (AttributeError, ValueError):  # not started, or already closed
        return None
    return sentinel if isinstance(sentinel, int) else None


def _exit_description(proc: Any) -> str:
    # vLLM's own monitor thread may have reaped it first; then the code is unknown here.
    code = proc.exitcode
    if code is None:
        return "exited"
    if code < 0:
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


class EngineExitWatch:
    """Calls `on_exit(ENGINE_DEAD, reason)` once, when the first engine process ends."""

    def __init__(self, processes: list[Any], on_exit: FailureHandler,
                 workers: list[psutil.Process] | None = None):
        self.processes = processes
        self.workers = workers or []
        self.on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fds: list[int] = []
        self._poll: asyncio.Task[None] | None = None

    def start(self) -> bool:
        """Watch from the running loop; False when there is nothing to watch."""
        self._loop = asyncio.get_running_loop()
        for proc in self.processes:
            fd = _sentinel(proc)
            if fd is None:
                continue
            self._loop.add_reader(fd, self._ended, proc)
            self._fds.append(fd)
        if self.workers:
            self._poll = asyncio.create_task(self._poll_workers(), name="vLLM worker poll")
        return bool(self._fds)

    async def _poll_workers(self) -> None:
        while True:
            await asyncio.sleep(WORKER_POLL_S)
            for proc in self.workers:
                if _gone(proc):
                    self._poll = None  # this very task, which ends here: not to be cancelled
                    self.stop()
                    self.on_exit(ExitCode.ENGINE_DEAD,
                                 f"engine dead: its vLLM Worker process (pid {proc.pid}) ended")
                    return

    def _ended(self, proc: Any) -> None:
        self.stop()
        name = getattr(proc, "name", "engine process")
        self.on_exit(ExitCode.ENGINE_DEAD,
                     f"engine dead: {name} (pid {proc.pid}) {_exit_description(proc)}")

    def stop(self) -> None:
        """Stop watching: before the worker shuts the engine down itself."""
        if self._loop is not None:
            for fd in self._fds:
                self._loop.remove_reader(fd)
        self._fds = []
        if self._poll is not None:
            self._poll.cancel()
        self._poll = None
