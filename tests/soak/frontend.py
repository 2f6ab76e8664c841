"""The soak through the node's front door: Dynamo's frontend as the supervisor's child.

With `SoakSettings.frontend`, the supervisor runs with [dynamo] and [frontend] on (Dynamo's
discovery in a directory of the soak's own: this node's workers, this node's frontend), the
load goes to the frontend's one port instead of each serving worker's, the instance is whole
only once the frontend serves with every worker behind it, and two faults hit the frontend
itself. Request migration (`frontend.migration_limit`) is on, as it is by default: a stream
cut by a dying worker may move on to the other one.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Any

from tests.soak.faults import Fault

if TYPE_CHECKING:
    from tests.soak.harness import Soak

# What detects a frontend fault: its exit (at once), or its poll failing poll_failures times.
FRONTEND_GONE, FRONTEND_STOPPED = "frontend_gone", "frontend_stopped"


def frontend_sections(soak: Soak, port: int) -> dict[str, dict[str, Any]]:
    return {"dynamo": {"enabled": True, "file_kv": str(soak.tmp / "dynamo-kv")},
            "frontend": {"enabled": True, "port": port, "router_mode": "kv"}}


def frontend_whole(frontend: dict[str, Any] | None, workers: int) -> bool:
    return bool(frontend and frontend.get("state") == "serving"
                and frontend.get("workers_listed") == workers)


def frontend_bound(kind: str | None, health: dict[str, float]) -> float | None:
    if kind == FRONTEND_GONE:
        return health["poll_interval"] + 1.0
    if kind == FRONTEND_STOPPED:
        return (health["poll_interval"] + health["poll_timeout"]) * health["poll_failures"]
    return None


def _needs_frontend(soak: Soak) -> str | None:
    return None if soak.settings.frontend else "the soak runs without the frontend"


def _signal_frontend(sig: signal.Signals) -> Any:
    def inject(soak: Soak, worker: int) -> Any:
        before = soak.frontend()
        pid = before.get("pid")
        if not isinstance(pid, int):
            raise AssertionError(f"the frontend has no process now: {before}")
        os.kill(pid, sig)
        return before
    return inject


def _frontend_back(soak: Soak, worker: int, before: Any) -> bool:
    """A new frontend process serves, with every worker behind it."""
    now = soak.frontend()
    return bool(now.get("pid") not in (None, before.get("pid"))
                and now.get("restarts", 0) > before.get("restarts", 0)
                and frontend_whole(now, soak.workers))


def frontend_struck(soak: Soak, before: Any) -> bool:
    """The supervisor no longer calls the frontend that was hit serving."""
    now = soak.frontend()
    return now.get("state") != "serving" or now.get("pid") != before.get("pid")


FRONTEND_FAULTS = [
    Fault("kill_frontend", "SIGKILL of Dynamo's frontend", _signal_frontend(signal.SIGKILL),
          _frontend_back, FRONTEND_GONE, available=_needs_frontend),
    Fault("stop_frontend", "SIGSTOP of Dynamo's frontend", _signal_frontend(signal.SIGSTOP),
          _frontend_back, FRONTEND_STOPPED, available=_needs_frontend),
]
