"""Idle sleep: a worker nobody asks for goes to sleep by itself, and the next request wakes it.

With `sleep.idle_after` seconds without a request the worker sleeps at `sleep.idle_level`
through the same controller as every sleep (out of discovery first, then the engine; on GPUs
level 1 frees the weights' and the KV cache's memory). A request that reaches it asleep (on
its own port: discovery no longer lists it) wakes it and is served, not refused. An
operator's sleep stays an operator's: only an idle sleep is undone by a request.

The idle clock counts only while the worker serves: a worker that comes back from any sleep
or checkpoint starts a fresh idle period. The canary is not a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from dynamo_vllm.agent.lifecycle import SleepController
from dynamo_vllm.agent.status import WorkerStatus

log = logging.getLogger(__name__)


class IdleSleep:
    def __init__(self, controller: SleepController, status: WorkerStatus,
                 admitted: Callable[[], int], idle_after: float, level: int,
                 clock: Callable[[], float] = time.monotonic):
        self.controller = controller
        self.status = status
        self.admitted = admitted
        self.idle_after = idle_after
        self.level = level
        self.clock = clock
        self.last_request = clock()
        self.wakes = 0

    def request_seen(self) -> None:
        """A request ended (the worker's HTTP front calls this; while any is admitted,
        `due` keeps the clock at now)."""
        self.last_request = self.clock()

    def due(self) -> bool:
        now = self.clock()
        if not self.status.serving or self.admitted() > 0:
            self.last_request = now
            return False
        return now - self.last_request >= self.idle_after

    async def run(self) -> None:
        tick = min(1.0, max(0.05, self.idle_after / 4))
        while True:
            await asyncio.sleep(tick)
            if not self.due():
                continue
            log.info("no request for %.0f s: going to sleep (level %d) until the next one",
                     self.clock() - self.last_request, self.level)
            code, reply = await self.controller.sleep(self.level, idle=True)
            if code != 200:
                log.warning("idle sleep failed: %s", reply.get("message"))
                self.last_request = self.clock()

    async def wake_for_request(self) -> bool:
        """Wake an idle-asleep worker for a request; True when it serves now (woken by this
        request or by another that came first). An operator's sleep is left alone."""
        if not self.controller.idle_asleep:
            return self.status.serving
        started = self.clock()
        code, reply = await self.controller.wake(None)
        if code != 200 or not self.status.serving:
            log.error("waking for a request failed: %s", reply.get("message"))
            return False
        if reply.get("message") != "already awake":
            self.wakes += 1
            log.info("woken by a request in %.3f s", self.clock() - started)
        self.last_request = self.clock()
        return True
