"""Taking one checkpoint: CRIU dumps the worker's tree into a staging entry of the store,
which is committed (renamed) only when complete; a failure removes it and keeps CRIU's log.
Every outcome is counted and logged with its `CheckpointResult`."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynamo_vllm.supervisor.checkpoint.criu import Checkpointer, CheckpointError
from dynamo_vllm.supervisor.checkpoint.processes import FULL_BELOW, free_bytes, reap
from dynamo_vllm.supervisor.checkpoint.results import CheckpointResult
from dynamo_vllm.supervisor.checkpoint.store import Busy, CheckpointStore, StoreError, make_private
from dynamo_vllm.supervisor.metrics import CheckpointMetrics
from dynamo_vllm.supervisor.worker_process import WorkerSpec

log = logging.getLogger(__name__)

IMAGES = "images"
METRICS = "metrics"


class CheckpointTaker:
    def __init__(self, store: CheckpointStore, checkpointer: Checkpointer,
                 metrics: CheckpointMetrics, work_root: Path, on_event: Callable[[str], None]):
        self.store = store
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.work_root = work_root
        self.on_event = on_event

    async def take(self, spec: WorkerSpec, pid: int, leave_running: bool,
                   identity: dict[str, Any], keep: set[str]) -> dict[str, Any]:
        """Dump the worker (paused at its ready marker) into the store; prune the store to
        `checkpoint.keep`, never removing a hash in `keep` (the workers' current ones)."""
        name, wanted = spec.name, spec.checkpoint_hash
        if self.store.has(wanted):
            return self.result(name, CheckpointResult.SKIPPED,
                               f"checkpoint {wanted} is stored already")
        try:
            staging = self.store.begin(wanted)
        except Busy as exc:
            return self.result(name, CheckpointResult.SKIPPED, str(exc))
        except (StoreError, OSError) as exc:
            return self.result(name, CheckpointResult.FAILED, str(exc))
        log.info("worker %s: taking checkpoint %s (pid %d)", name, wanted, pid)
        started = time.monotonic()
        try:
            (staging.path / IMAGES).mkdir(mode=0o700)
            dump = await self.checkpointer.dump(pid, staging.path / IMAGES, leave_running)
            make_private(staging.path / IMAGES)
            # Metric files keep their mode: CRIU checks it when it maps them again.
            shutil.copytree(spec.metrics_dir, staging.path / METRICS, symlinks=True)
            os.chmod(staging.path / METRICS, 0o700)
            entry = staging.commit({
                "worker": spec.index, "pid": pid, "stdio": dump.stdio,
                "dump_seconds": round(dump.seconds, 3), "checkpointer": self.checkpointer.name,
                "identity": identity,
            })
        except Exception as exc:
            # Before the partial dump is removed: a full filesystem also cuts CRIU's own
            # log short, so its words may not say why.
            free = free_bytes(staging.path)
            self._keep_log(staging.path / IMAGES / "dump.log", name)
            staging.abort()
            if not isinstance(exc, CheckpointError | StoreError | OSError):
                raise
            reason = str(exc)
            if (isinstance(exc, OSError) and exc.errno == 28) or free < FULL_BELOW:
                reason = (f"no space left on the checkpoint store's filesystem "
                          f"({free / 2**20:.0f} MiB free at the failure): {reason}")
            return self.result(name, CheckpointResult.FAILED, reason)
        if not leave_running and dump.pids:
            await reap(dump.pids)
        seconds = time.monotonic() - started
        self.metrics.duration.labels(worker=name).set(seconds)
        self.metrics.size.labels(worker=name).set(entry.size_bytes)
        removed = self.store.prune(keep)
        if removed:
            log.info("checkpoint store: removed %s (checkpoint.keep = %d)", ", ".join(removed),
                     self.store.keep)
        self.count_stored()
        return self.result(name, CheckpointResult.TAKEN,
                           f"checkpoint {wanted} stored in {seconds:.1f} s "
                           f"({entry.size_bytes / 2**20:.0f} MiB)",
                           hash=wanted, seconds=round(seconds, 3), size_bytes=entry.size_bytes)

    def _keep_log(self, log_path: Path, worker: str) -> None:
        """CRIU's log of a failed dump outlives the removed tmp/ entry, in the runtime dir."""
        if not log_path.is_file():
            return
        directory = self.work_root / worker
        with contextlib.suppress(OSError):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            kept = directory / f"dump-failed-{int(time.time())}.log"
            shutil.copyfile(log_path, kept)
            log.error("CRIU's log of the failed dump: %s", kept)

    def result(self, worker: str, result: CheckpointResult, message: str,
               **extra: Any) -> dict[str, Any]:
        self.metrics.checkpoints.labels(worker=worker, result=result.value).inc()
        text = f"worker {worker} checkpoint {result}: {message}"
        (log.error if result is CheckpointResult.FAILED else log.info)("%s", text)
        self.on_event(text)
        return {"worker": worker, "result": result, "message": message, **extra}

    def count_stored(self) -> None:
        with contextlib.suppress(OSError):
            self.metrics.stored.set(sum(1 for e in self.store.entries() if e.state == "complete"))
