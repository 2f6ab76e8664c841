"""One fault injected into a whole instance, timed: how long until the supervisor stopped
calling what was hit serving (detection, against a bound computed from the config), and how
long until the fault's own recovery condition held."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from tests.soak.faults import DEAD, GONE, HUNG, STOPPED, Fault
from tests.soak.frontend import frontend_bound, frontend_struck
from tests.soak.report import FaultResult

if TYPE_CHECKING:
    from tests.soak.harness import Soak

# Two busy cores: the observer, the supervisor and the engines compete for them.
SLACK_S = 3.0
FAULT_TIMEOUT_S = 180.0


def detection_bound(kind: str | None, health: dict[str, float]) -> float | None:
    h = health
    if kind == DEAD:
        return h["interval"] + h["check_timeout"] + h["poll_interval"] + h["poll_timeout"]
    if kind == HUNG:
        return (h["canary_idle"] + h["canary_timeout"] * h["canary_failures"]
                + h["interval"] + h["poll_interval"] + h["poll_timeout"])
    if kind == GONE:
        return h["poll_interval"] + 1.0
    if kind == STOPPED:
        return (h["poll_interval"] + h["poll_timeout"]) * h["poll_failures"]
    return frontend_bound(kind, h)


def _wait_whole(soak: Soak) -> str:
    try:
        soak.wait(soak.whole, FAULT_TIMEOUT_S, "the instance whole again before a fault",
                  interval=0.25)
        time.sleep(1.0)
        # Still whole after the pause (a status read just before a restart is stale).
        soak.wait(soak.whole, FAULT_TIMEOUT_S, "the instance whole after the pause",
                  interval=0.25)
    except TimeoutError as exc:
        return str(exc)
    return ""


def inject(soak: Soak, fault: Fault, worker: int) -> FaultResult:
    """Waits for the instance to be whole, injects `fault`, and times what followed."""
    not_whole = _wait_whole(soak)
    if not_whole:
        return FaultResult(fault.name, worker, None, None, None, not_whole)
    bound = detection_bound(fault.detection, soak.health)
    pid = soak.worker(worker)["pid"]
    reasons_before = dict(soak.worker(worker).get("restarts_by_reason") or {})
    started = time.monotonic()
    detected = recovered = None
    state: Any = None
    error = ""
    on_frontend = fault.detection is not None and fault.detection.startswith("frontend")

    def left_serving() -> bool:
        if on_frontend:
            return frontend_struck(soak, state)
        now = soak.worker(worker)
        return bool(now["state"] != "serving" or now["pid"] != pid)

    try:
        state = fault.inject(soak, worker)
        deadline = started + FAULT_TIMEOUT_S
        struck: float | None = None if fault.struck else started
        while time.monotonic() < deadline:
            if struck is None and fault.struck is not None and fault.struck(soak, worker, state):
                struck = time.monotonic()
            if detected is None and fault.detection is not None and struck is not None \
                    and left_serving():
                detected = time.monotonic() - struck
            if fault.recovered(soak, worker, state):
                recovered = time.monotonic() - started
                break
            time.sleep(0.1)
        else:
            error = f"not recovered within {FAULT_TIMEOUT_S:g} s"
    except Exception as exc:  # one fault that cannot be done must not end the soak
        error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if fault.cleanup is not None and state is not None:
            with contextlib.suppress(Exception):
                fault.cleanup(soak, worker, state)
    what = "the frontend" if on_frontend else f"worker {worker}"
    if fault.detection is not None and recovered is not None:
        if detected is None:
            detected = recovered
        if bound is not None and detected > bound + SLACK_S:
            soak.violations.append(
                f"{fault.name} on {what}: still called serving {detected:.1f} s after the "
                f"fault (bound {bound:.1f} s + {SLACK_S:g})")
    if error:
        soak.violations.append(f"{fault.name} on {what}: {error}")
    reasons_after = dict(soak.worker(worker).get("restarts_by_reason") or {})
    moved = sorted(r for r, n in reasons_after.items() if n > reasons_before.get(r, 0))
    return FaultResult(fault.name, worker, detected, recovered, bound, error, ", ".join(moved))
