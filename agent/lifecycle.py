"""Sleep and wake: a worker leaves the pool and comes back without losing a request.

One lock serialises every transition; both calls are idempotent. Sleep: unregister from
discovery, stop admitting (the HTTP front answers 503 with Retry-After), let requests in
flight finish within `sleep.drain_timeout` or abort them with an explicit error, then pause
the engine (level 0) or put it to sleep (vLLM levels 1 and 2). Wake: wake the engine, resume,
and only when fully awake admit again and re-register. A failure at any step rolls back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dynamo_vllm.agent.status import WorkerStatus
from dynamo_vllm.contract.protocol import WorkerState

log = logging.getLogger(__name__)

SLEEP_LEVELS = (0, 1, 2)
# How long a sleep waits for requests admitted before it to reach the engine (and aborts them).
LATE_ARRIVALS_S = 1.0
WAKE_TAGS = ("weights", "kv_cache")

Reply = tuple[int, dict[str, Any]]


def ok(message: str, **extra: Any) -> Reply:
    return 200, {"status": "ok", "message": message, **extra}


def error(code: int, message: str, **extra: Any) -> Reply:
    return code, {"status": "error", "message": message, **extra}


class SleepController:
    def __init__(self, engine: Any, status: WorkerStatus,
                 set_state: Callable[[WorkerState, str], None],
                 register: Callable[[], Awaitable[None]],
                 unregister: Callable[[], Awaitable[None]],
                 inflight: str, drain_timeout: float, memory_release: bool,
                 admitted: Callable[[], int] = lambda: 0):
        self.engine = engine
        self.admitted = admitted
        self.status = status
        self.set_state = set_state
        self.register = register
        self.unregister = unregister
        self.inflight = inflight
        self.drain_timeout = drain_timeout
        self.memory_release = memory_release
        self.lock = asyncio.Lock()
        self.level: int | None = None
        self.asleep_tags: set[str] = set()
        # Asleep because nobody asked for the worker (sleep.idle_after): a request wakes it.
        self.idle_asleep = False

    @property
    def sleeping(self) -> bool:
        return self.level is not None

    def describe(self) -> dict[str, Any]:
        return {"is_sleeping": self.sleeping, "level": self.level, "idle": self.idle_asleep,
                "asleep_tags": sorted(self.asleep_tags),
                "memory_release_supported": self.memory_release,
                # What a sleep (or a stop) would wait for now.
                "requests_in_flight": self._in_flight()}

    def _in_flight(self) -> int:
        # Admitted by the HTTP front (possibly not yet in the engine), or in the engine.
        return max(int(self.admitted()), int(self.engine.get_num_unfinished_requests()))

    async def _drain(self) -> int:
        """Wait for requests in flight (drain mode), then abort what is left. Returns how
        many were aborted."""
        if self.inflight == "drain" and self.drain_timeout > 0:
            deadline = time.monotonic() + self.drain_timeout
            while self._in_flight() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        left = self._in_flight()
        # Aborted requests end with finish_reason "abort": an explicit error, never silence.
        await self.engine.pause_generation(mode="abort", clear_cache=False)
        await self._abort_late_arrivals()
        return left

    async def _abort_late_arrivals(self) -> None:
        """A request the HTTP front admitted just before the sleep can reach the engine
        after the pause, where it would wait, frozen, until the wake (found by the sleep
        benchmark in abort mode: one stream in twenty hung 120 s). Abort those too."""
        deadline = time.monotonic() + LATE_ARRIVALS_S
        while self.admitted() and time.monotonic() < deadline:
            processor = getattr(self.engine, "output_processor", None)
            late = list(getattr(processor, "request_states", {}))
            if late:
                await self.engine.abort(late)
            await asyncio.sleep(0.02)

    async def sleep(self, level: int, idle: bool = False) -> Reply:
        async with self.lock:
            if self.sleeping:
                if not idle:  # an operator's sleep now: requests no longer wake it
                    self.idle_asleep = False
                return ok("already sleeping", level=self.level, **self._memory(self.level))
            if not self.status.serving:
                return error(409, f"cannot sleep: the worker is {self.status.state.value} "
                                  f"({self.status.reason})")
            started = time.monotonic()
            try:
                await self.unregister()
            except Exception as exc:
                return error(503, f"cannot sleep: unregistering from discovery failed: {exc}; "
                                  "still serving")
            unregistered = time.monotonic() - started
            # Marked before the drain: a request that comes while an idle sleep is under way
            # waits for it on the lock and then wakes the worker, instead of a 503.
            self.idle_asleep = idle
            self.set_state(WorkerState.SLEEPING, f"going to sleep (level {level})")
            aborted = 0
            try:
                aborted = await self._drain()
                drained = time.monotonic() - started
                if level >= 1:
                    await self.engine.sleep(level, mode="abort")
            except Exception as exc:
                log.exception("sleep (level %d) failed; rolling back", level)
                self.idle_asleep = False
                rolled_back = await self._roll_back(level)
                return error(500, f"sleep failed: {type(exc).__name__}: {exc}; "
                                  + ("rolled back, still serving" if rolled_back
                                     else "roll-back failed too, see the log"))
            self.level = level
            self.asleep_tags = set(WAKE_TAGS) if level >= 1 else set()
            self.set_state(WorkerState.SLEEPING, f"asleep (level {level}" +
                           (", idle: a request wakes it)" if idle else ")"))
            seconds = time.monotonic() - started
            log.info("asleep at level %d after %.2f s (%d request(s) aborted)", level, seconds,
                     aborted)
            # Where the time went, from the call: out of discovery, drained, asleep.
            steps = {"unregistered": round(unregistered, 4), "drained": round(drained, 4),
                     "asleep": round(seconds, 4)}
            return ok(f"asleep (level {level})", level=level, aborted_requests=aborted,
                      seconds=round(seconds, 3), steps_s=steps, **self._memory(level))

    def _memory(self, level: int | None) -> dict[str, Any]:
        released = bool(level and self.memory_release)
        note: dict[str, Any] = {"memory_released": released}
        if level == 0:
            note["memory_note"] = "level 0 pauses the engine and keeps its memory"
        elif level and not released:
            note["memory_note"] = ("vLLM cannot release memory on this platform (sleep mode is "
                                   "not available, e.g. the CPU engine): the engine is paused, "
                                   "its memory stays allocated")
        return note

    async def _roll_back(self, level: int) -> bool:
        try:
            if level >= 1 and await self.engine.is_sleeping():
                await self.engine.wake_up(None)
            await self.engine.resume_generation()
            self.set_state(WorkerState.SERVING, "serving (sleep rolled back)")
            await self.register()
            return True
        except Exception:
            log.exception("rolling back a failed sleep failed")
            return False

    async def wake(self, tags: list[str] | None) -> Reply:
        async with self.lock:
            if not self.sleeping:
                return ok("already awake")
            level = self.level or 0
            started = time.monotonic()
            try:
                if level >= 1:
                    fully_awake = await self.engine.wake_up(tags)
                    self.asleep_tags -= set(tags or WAKE_TAGS)
                    if not fully_awake and self.asleep_tags:
                        return ok("partly awake: still asleep: " + ", ".join(
                            sorted(self.asleep_tags)), awake=False,
                            asleep_tags=sorted(self.asleep_tags))
                await self.engine.resume_generation()
            except Exception as exc:
                log.exception("wake failed")
                return error(500, f"wake failed: {type(exc).__name__}: {exc}; still asleep, "
                                  "try again")
            self.level = None
            self.asleep_tags = set()
            self.idle_asleep = False
            self.set_state(WorkerState.SERVING, "serving")
            self.status.progressed()
            try:
                await self.register()
            except Exception as exc:
                # Awake and serving; the record comes back on the next registration.
                log.error("woke, but re-registering in discovery failed: %s", exc)
                return ok("awake, but not registered in discovery", awake=True,
                          registered=False, error=str(exc))
            seconds = time.monotonic() - started
            log.info("awake after %.2f s; registered again", seconds)
            return ok("awake", awake=True, registered=True, seconds=round(seconds, 3))
