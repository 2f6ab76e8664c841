"""What the main loop tidies on every tick: runtime directories something removed under
running workers, and orphaned processes the supervisor inherited as a child subreaper."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING

import psutil

from dynamo_vllm.supervisor.workers import WorkerHandle

if TYPE_CHECKING:
    from dynamo_vllm.supervisor.checkpoint.coordinator import CheckpointCoordinator
    from dynamo_vllm.supervisor.metrics import SupervisorMetrics

log = logging.getLogger(__name__)


def repair_dirs(handles: list[WorkerHandle], chrek: CheckpointCoordinator | None,
                metrics: SupervisorMetrics) -> None:
    """Put back runtime directories something removed while workers use them (a clean-up
    job, an operator): without them metrics vanish and restores fail."""
    for handle in handles:
        relinked = handle.repair_metrics_dir()
        if relinked is not None:
            metrics.dirs_recreated.labels(kind="metrics").inc()
            log.warning("worker %s: its metrics directory %s was removed; put back, with "
                        "the %d file(s) the worker still holds", handle.name,
                        handle.spec.metrics_dir, relinked)
    if chrek is not None:
        for path in chrek.repair_dirs():
            metrics.dirs_recreated.labels(kind="control").inc()
            log.warning("checkpoint control directory %s was removed; put back", path)


def reap_orphans(handles: list[WorkerHandle], seen_before: set[int]) -> set[int]:
    """As a child subreaper the supervisor inherits orphans (an engine process whose worker
    died): reap them. Only zombies seen twice (`seen_before`, what the last call returned),
    so that asyncio's own child watcher always collects its processes first."""
    ours = {h.proc.pid for h in handles if h.proc is not None}
    try:
        zombies = {p.pid for p in psutil.Process().children()
                   if p.pid not in ours and p.status() == psutil.STATUS_ZOMBIE}
    except psutil.Error:
        return seen_before
    for pid in zombies & seen_before:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    return zombies
