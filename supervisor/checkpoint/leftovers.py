"""A worker a previous supervisor left waiting at its ready marker (the supervisor was
restarted while the worker waited for its dump): found by the scan at start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from dynamo_vllm.contract.markers import MarkerError, parse_ready, read_marker, remove_markers
from dynamo_vllm.contract.protocol import Marker
from dynamo_vllm.supervisor.checkpoint.processes import alive, not_our_worker
from dynamo_vllm.supervisor.checkpoint.results import CheckpointResult

if TYPE_CHECKING:
    from dynamo_vllm.supervisor.checkpoint.coordinator import CheckpointCoordinator

log = logging.getLogger(__name__)


async def end_left_waiting(coordinator: CheckpointCoordinator, worker: str) -> None:
    """A worker of a previous supervisor waits at its ready marker: take its checkpoint
    (which ends it) so that this supervisor restores it as its own child."""
    directory = coordinator.control_root / worker
    spec = coordinator.specs.get(worker)
    owner = spec.owner if spec is not None else None
    try:
        content = read_marker(directory, Marker.READY, writer=owner[0] if owner else None)
        ready = parse_ready(content or b"")
    except MarkerError as exc:
        log.warning("worker %s: left-over %s", worker, exc)
        coordinator.metrics.marker_errors.inc()
        remove_markers(directory, Marker.ALL)
        return
    pid = int(ready["pid"])
    if not alive(pid):
        log.info("worker %s: a stale %s (pid %d is gone); removed", worker, Marker.READY, pid)
        remove_markers(directory, Marker.ALL)
        return
    stranger = not_our_worker(pid, directory, owner[0] if owner else os.geteuid())
    if stranger is not None:
        log.warning("worker %s: a left-over %s names a process that is not ours (%s); "
                    "removed, the process left alone", worker, Marker.READY, stranger)
        coordinator.metrics.marker_errors.inc()
        remove_markers(directory, Marker.ALL)
        return
    if spec is not None and spec.checkpoint_hash == ready["hash"]:
        log.info("worker %s: found waiting at its ready marker (pid %d, left by a previous "
                 "supervisor)", worker, pid)
        result = await coordinator.take(spec, pid, leave_running=False, marker_hash=ready["hash"])
        if result["result"] is CheckpointResult.TAKEN:
            remove_markers(directory, Marker.ALL)
            return
    log.warning("worker %s: ending pid %d, left waiting by a previous supervisor", worker,
                pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    remove_markers(directory, Marker.ALL)
