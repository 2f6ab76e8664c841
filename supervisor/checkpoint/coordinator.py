"""Checkpoint/restore on the supervisor's side: what Dynamo's privileged node agent does in
Kubernetes, done by the unit's main process.

Per worker, a state machine:

    cold start -> ready-for-snapshot -> checkpointing -> stored -> (the worker serves on)
    start with a stored checkpoint for its hash -> restoring -> restore-complete -> serving
    any failure -> a cold start, the reason in the log, in STATUS= and in a metric

A worker is spawned in snapshot mode (warm up, pause, `ready-for-snapshot`) only when a
checkpoint is wanted: checkpoints are on and work here, `checkpoint.auto` (or an operator's
request) and none is stored for its hash. The dump ends the worker (Dynamo's newest contract
kills the source too), and the supervisor restores it at once from what it just stored: the
image is proven before anyone relies on it, and CRIU's link-remap files (deleted files the
tree still uses) exist only after a dump that ends the tree. Later starts of that worker
restore the image. A restored tree is re-parented to the supervisor (a child subreaper), so
it is supervised like any worker. A failed dump leaves the worker serving, cold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from dynamo_vllm.contract.config import Config
from dynamo_vllm.contract.gate import TokenError, load_token
from dynamo_vllm.contract.markers import (
    MarkerError,
    parse_ready,
    read_marker,
    remove_markers,
    restore_context_document,
    write_marker,
)
from dynamo_vllm.contract.protocol import Env, Marker, Route
from dynamo_vllm.supervisor import http_client
from dynamo_vllm.supervisor.checkpoint.criu import Checkpointer, CheckpointError, CriuCheckpointer
from dynamo_vllm.supervisor.checkpoint.identity import (
    accelerator,
    checkpoint_hash,
    engine_version,
    gpu_names,
    identity,
)
from dynamo_vllm.supervisor.checkpoint.leftovers import end_left_waiting
from dynamo_vllm.supervisor.checkpoint.processes import become_subreaper, split_problem, store_root
from dynamo_vllm.supervisor.checkpoint.results import CheckpointResult, RestoreResult
from dynamo_vllm.supervisor.checkpoint.store import CheckpointStore, StoreError, read_metadata
from dynamo_vllm.supervisor.checkpoint.taking import IMAGES, METRICS, CheckpointTaker
from dynamo_vllm.supervisor.checkpoint.watcher import MarkerWatcher
from dynamo_vllm.supervisor.metrics import CheckpointMetrics
from dynamo_vllm.supervisor.tasks import observed
from dynamo_vllm.supervisor.worker_process import WorkerSpec
from dynamo_vllm.supervisor.workers import WorkerHandle

log = logging.getLogger(__name__)

# Names a restored worker takes from the supervisor of now (CRIU brings back the old ones).
CONTEXT_ENV = (Env.SUPERVISOR_PID, Env.INSTANCE, Env.DISCOVERY_DIR, Env.ETCD_ENDPOINTS)


class CheckpointCoordinator:
    gpu_names = staticmethod(gpu_names)  # callers need not import this package for it

    def __init__(self, config: Config, runtime_dir: Path, instance: str,
                 metrics: CheckpointMetrics, checkpointer: Checkpointer | None = None):
        self.config = config
        settings = config.checkpoint
        self.store = CheckpointStore(store_root(config, runtime_dir, instance), settings.keep)
        self.checkpointer = checkpointer or CriuCheckpointer(settings.criu, settings.criu_libdir,
                                                             settings.timeout)
        self.metrics = metrics
        self.control_root = runtime_dir / "control"
        self.work_root = runtime_dir / "criu"
        self.unavailable: str | None = "not checked yet"
        self.taker = CheckpointTaker(self.store, self.checkpointer, metrics, self.work_root,
                                     self._event)
        self.watcher = MarkerWatcher(self.control_root, self._on_marker)
        self.handles: dict[str, WorkerHandle] = {}
        self.specs: dict[str, WorkerSpec] = {}
        self.identities: dict[str, dict[str, Any]] = {}
        self.last_event = ""
        self.last_event_at = 0.0
        self._engine = ""
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        # Hashes whose restore failed in this supervisor's life: no automatic dump of them
        # again, or a host where restores cannot work would cold start, dump and fail to
        # restore forever (seen under a unit sandbox that CRIU's restore needed more of).
        self._restore_failed: set[str] = set()

    # ------------------------------------------------------------ start

    async def prepare(self, specs: list[WorkerSpec], gpu_names: dict[int, str]) -> None:
        """Check CRIU and the store, give every worker its hash and control directory, watch
        the markers, and deal with markers left while no supervisor watched."""
        become_subreaper()
        try:
            removed = self.store.prepare()
            if removed:
                log.info("checkpoint store: removed unfinished %s", ", ".join(removed))
            self.unavailable = await asyncio.to_thread(self.checkpointer.check) or \
                split_problem(any(s.account for s in specs))
        except StoreError as exc:
            self.unavailable = f"checkpoint.store: {exc}"
        if self.unavailable:
            log.error("checkpoints unavailable: %s; workers start cold", self.unavailable)
            self._event(f"checkpoints unavailable: {self.unavailable}")
        else:
            log.info("checkpoints on (%s), store %s", self.checkpointer.name, self.store.root)
        self.metrics.available.set(0 if self.unavailable else 1)
        python = specs[0].python if specs else ""
        self._engine = await asyncio.to_thread(engine_version, python) if python else "unknown"
        self.control_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for spec in specs:
            await self.assign(spec, gpu_names)
        self.watcher.start(asyncio.get_running_loop())
        for worker, marker in self.watcher.scan():
            if marker == Marker.READY:
                await end_left_waiting(self, worker)
        self.taker.count_stored()

    async def assign(self, spec: WorkerSpec, gpu_names: dict[int, str]) -> None:
        """Hash and control directory of one worker spec (a new config gets new ones)."""
        document = await asyncio.to_thread(
            identity, self.config, spec.index, spec.port, spec.gpus, spec.cpus,
            spec.python, self._engine, accelerator(gpu_names, spec.gpus))
        spec.checkpoint_hash = checkpoint_hash(document)
        spec.control_dir = self.control_root / spec.name
        spec.control_dir.mkdir(mode=0o700, exist_ok=True)
        if spec.account is not None:
            spec.account.let_in(self.control_root)
        spec.own_dir(spec.control_dir)
        self.specs[spec.name] = spec
        if spec.control_dir.is_symlink() or not spec.control_dir.is_dir():
            raise StoreError(f"{spec.control_dir} is not a directory (refused)")
        self.identities[spec.name] = document

    def repair_dirs(self) -> list[str]:
        """Put back control directories removed under a running supervisor (the markers in
        them go too: a worker waiting for one is bounded by checkpoint.timeout). Returns
        those put back. A new root needs a new watch; a worker's directory is picked up by
        the recursive one."""
        put_back: list[str] = []
        if not self.watcher.running:
            return put_back
        if not self.control_root.is_dir():
            self.control_root.mkdir(mode=0o700, parents=True, exist_ok=True)
            put_back.append(str(self.control_root))
        if not self.watcher.watching:
            self.watcher.restart()
        for spec in self.specs.values():
            path = spec.control_dir
            if path is not None and not os.path.lexists(path):
                path.mkdir(mode=0o700, exist_ok=True)
                if spec.account is not None:
                    spec.account.let_in(self.control_root)
                spec.own_dir(path)
                put_back.append(str(path))
        return put_back

    def watch(self, handle: WorkerHandle) -> None:
        self.handles[handle.name] = handle
        self.metrics.init_worker(handle.name)

    def stop(self) -> None:
        self.watcher.stop()
        for task in self._tasks.values():
            task.cancel()

    # ------------------------------------------------------------ spawning and restoring

    def wants_checkpoint(self, spec: WorkerSpec) -> bool:
        return (self.unavailable is None and bool(spec.checkpoint_hash)
                and self.config.checkpoint.auto
                and spec.checkpoint_hash not in self._restore_failed
                and not self.store.has(spec.checkpoint_hash))

    def can_restore(self, spec: WorkerSpec) -> bool:
        return (self.unavailable is None and self.config.checkpoint.restore
                and bool(spec.checkpoint_hash) and self.store.has(spec.checkpoint_hash))

    def spawn_env(self, spec: WorkerSpec) -> dict[str, str]:
        """What a cold-started worker is told: its control directory and hash, and snapshot
        mode at start when a checkpoint of it is wanted."""
        if spec.control_dir is None:
            return {}
        remove_markers(spec.control_dir, Marker.ALL)
        env = {Env.CONTROL_DIR: str(spec.control_dir), Env.CHECKPOINT_HASH: spec.checkpoint_hash,
               Env.CHECKPOINT_LOCATION: str(self.store.root)}
        if self.wants_checkpoint(spec):
            env[Env.SNAPSHOT_CONTROL_DIR] = str(spec.control_dir)
        return env

    async def restore(self, handle: WorkerHandle) -> None:
        """Bring the worker back from its checkpoint; raises CheckpointError on any failure
        (the caller starts it cold)."""
        spec = handle.spec
        assert spec.control_dir is not None
        started = time.monotonic()
        try:
            path = self.store.path(spec.checkpoint_hash)
            metadata = read_metadata(self.store, spec.checkpoint_hash)
            remove_markers(spec.control_dir, Marker.ALL)
            # The image has the metric files mapped and sockets bound at their paths.
            handle.fresh_life_dirs()
            if (path / METRICS).is_dir():
                shutil.copytree(path / METRICS, spec.metrics_dir, dirs_exist_ok=True,
                                symlinks=True)
            pid = await self.checkpointer.restore(path / IMAGES, self.work_root / spec.name,
                                                  dict(metadata.get("stdio") or {}))
        except (StoreError, OSError) as exc:
            raise CheckpointError(str(exc)) from None
        handle.adopt(pid, started)
        self._answer(spec)
        log.info("worker %s: restored from checkpoint %s in %.2f s (criu); waking it",
                 spec.name, spec.checkpoint_hash, time.monotonic() - started)

    def restore_failed(self, handle: WorkerHandle, exc: Exception) -> None:
        spec = handle.spec
        log.error("worker %s: restore from checkpoint %s failed: %s; starting cold and "
                  "discarding the checkpoint", spec.name, spec.checkpoint_hash, exc)
        self.metrics.restores.labels(worker=spec.name, result=RestoreResult.COLD_START).inc()
        self._event(f"worker {spec.name} restore failed, cold start: {exc}")
        with contextlib.suppress(StoreError, OSError):
            self.store.remove(spec.checkpoint_hash)
        self.taker.count_stored()
        if self.config.checkpoint.auto and spec.checkpoint_hash not in self._restore_failed:
            log.error("worker %s: no automatic checkpoint of %s again until the supervisor "
                      "restarts (`dynamo-vllm checkpoint` still takes one)", spec.name,
                      spec.checkpoint_hash)
        self._restore_failed.add(spec.checkpoint_hash)

    def started(self, handle: WorkerHandle) -> None:
        self.metrics.restored.labels(worker=handle.name).set(1 if handle.restored else 0)

    def serving(self, handle: WorkerHandle) -> None:
        """The worker serves: a restore, if it was one, is done."""
        seconds = handle.restore_done()
        if seconds is not None:
            self.metrics.restore_duration.labels(worker=handle.name).set(seconds)
            self.metrics.restores.labels(worker=handle.name, result=RestoreResult.RESTORED).inc()
            self._event(f"worker {handle.name} restored in {seconds:.1f} s")
            log.info("worker %s serving %.2f s after its restore began", handle.name, seconds)

    # ------------------------------------------------------------ checkpoints

    def _on_marker(self, worker: str, marker: str) -> None:
        if marker != Marker.READY:
            return  # restore-complete and snapshot-complete are ours
        handle = self.handles.get(worker)
        if handle is None:
            log.warning("marker %s for unknown worker %r; ignored", marker, worker)
            self.metrics.marker_errors.inc()
            return
        running = self._tasks.get(worker)
        if running is None or running.done():
            self._tasks[worker] = observed(self._on_ready(handle), f"checkpoint-worker{worker}",
                                           lambda exc: self._answer(handle.spec))

    async def _on_ready(self, handle: WorkerHandle) -> None:
        spec = handle.spec
        assert spec.control_dir is not None
        try:
            content = read_marker(spec.control_dir, Marker.READY,
                                  writer=spec.owner[0] if spec.owner else None)
            if content is None:
                return
            ready = parse_ready(content)
        except MarkerError as exc:
            log.warning("worker %s: %s; ignored, the worker is told to serve", spec.name, exc)
            self.metrics.marker_errors.inc()
            remove_markers(spec.control_dir, (Marker.READY,))
            self._answer(spec)
            return
        if ready["pid"] != handle.pid:
            log.warning("worker %s: %s names pid %s, not the worker's (%s); ignored",
                        spec.name, Marker.READY, ready["pid"], handle.pid)
            self.metrics.marker_errors.inc()
            return
        assert handle.pid is not None
        try:
            result = await self.take(spec, handle.pid, leave_running=False,
                                     marker_hash=ready["hash"])
        except Exception as exc:  # the worker must be answered whatever happens here
            log.exception("worker %s: checkpoint failed unexpectedly", spec.name)
            result = self.taker.result(spec.name, CheckpointResult.FAILED,
                                       f"{type(exc).__name__}: {exc}")
        if result["result"] is CheckpointResult.TAKEN:
            # The dump ended the worker; its supervising task restores it from the store.
            handle.request_restart()
        else:
            self._answer(spec)
        waiter = self._waiters.pop(spec.name, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    async def take(self, spec: WorkerSpec, pid: int, leave_running: bool,
                   marker_hash: str | None = None) -> dict[str, Any]:
        """Dump the worker (paused at its ready marker) into the store."""
        name, wanted = spec.name, spec.checkpoint_hash
        if marker_hash is not None and marker_hash != wanted:
            return self.taker.result(name, CheckpointResult.FAILED,
                                     f"the worker's hash {marker_hash} is not its spec's "
                                     f"{wanted} (config changed); not taken")
        if self.unavailable:
            return self.taker.result(name, CheckpointResult.FAILED,
                                     f"checkpoints unavailable: {self.unavailable}")
        return await self.taker.take(spec, pid, leave_running, self.identities.get(name, {}),
                                     {h.spec.checkpoint_hash for h in self.handles.values()})

    def _answer(self, spec: WorkerSpec) -> None:
        """Tell the worker to go on: the environment of now, then `restore-complete`."""
        assert spec.control_dir is not None
        env = spec.environment(dict(os.environ))
        context = {name: env.get(name) for name in CONTEXT_ENV}
        try:
            spec.control_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_marker(spec.control_dir, Marker.RESTORE_CONTEXT,
                         restore_context_document(context), owner=spec.owner)
            write_marker(spec.control_dir, Marker.RESTORE_COMPLETE, b"restored",
                         owner=spec.owner)
        except OSError as exc:
            log.error("worker %s: cannot write %s: %s (it serves after checkpoint.timeout)",
                      spec.name, Marker.RESTORE_COMPLETE, exc)

    # ------------------------------------------------------------ operator requests

    async def request_checkpoint(self, worker: str) -> tuple[int, dict[str, Any]]:
        """POST /checkpoint: take one of this worker now, while it serves."""
        handle = self.handles.get(worker)
        if handle is None:
            return 404, {"error": f"no worker {worker}"}
        if self.unavailable:
            return 503, {"error": f"checkpoints unavailable: {self.unavailable}"}
        spec = handle.spec
        if self.store.has(spec.checkpoint_hash):
            return 200, self.taker.result(worker, CheckpointResult.SKIPPED,
                                     f"checkpoint {spec.checkpoint_hash} is stored already",
                                     hash=spec.checkpoint_hash)
        if not handle.serving:
            return 409, {"error": f"worker {worker} is {handle.state}; a checkpoint is "
                                  "taken while it serves"}
        if worker in self._waiters:
            return 409, {"error": f"a checkpoint of worker {worker} is being taken"}
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[worker] = waiter
        try:
            token = load_token(self.config.workers.control_token_file) \
                if self.config.workers.control_token_file else None
            code, body = await http_client.post_json(spec.host, spec.port, Route.ENGINE_SNAPSHOT,
                                                      {}, 10.0, token=token)
        except TokenError as exc:
            self._waiters.pop(worker, None)
            return 503, {"error": f"workers.control_token_file: {exc}"}
        except (TimeoutError, http_client.PollError) as exc:
            self._waiters.pop(worker, None)
            return 503, {"error": f"worker {worker} did not answer: {exc}"}
        if code != 202:
            self._waiters.pop(worker, None)
            message = body.get("message") if isinstance(body, dict) else body
            return 409, {"error": f"worker {worker} refused: {message}"}
        try:
            result = await asyncio.wait_for(waiter, self.config.checkpoint.timeout + 30)
        except TimeoutError:
            return 503, {"error": f"no ready marker from worker {worker} in time"}
        finally:
            self._waiters.pop(worker, None)
        return (200 if result["result"] is not CheckpointResult.FAILED else 503), result

    def request_restore(self, worker: str) -> tuple[int, dict[str, Any]]:
        """POST /restore: restart the worker from its checkpoint."""
        handle = self.handles.get(worker)
        if handle is None:
            return 404, {"error": f"no worker {worker}"}
        if not self.can_restore(handle.spec):
            why = self.unavailable or f"no checkpoint stored for its hash " \
                                      f"{handle.spec.checkpoint_hash}"
            return 409, {"error": f"worker {worker} cannot be restored: {why}"}
        handle.request_restart()
        observed(handle.stop(self.config.workers.stop_timeout), f"restore-worker{worker}")
        return 202, {"worker": worker, "result": RestoreResult.RESTORING,
                     "message": f"worker {worker} stops and is restored from "
                                f"{handle.spec.checkpoint_hash}"}

    # ------------------------------------------------------------ reporting

    def _event(self, text: str) -> None:
        self.last_event = text
        self.last_event_at = time.monotonic()

    def describe(self) -> dict[str, Any]:
        return {"available": self.unavailable is None, "unavailable_reason": self.unavailable,
                "store": str(self.store.root), "last_event": self.last_event or None}
