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
tree still uses) exist only after a dump that ends the tree. Every later start of that
worker restores the image instead of starting cold. A restored tree is re-parented to the
supervisor (a child subreaper), so it is supervised like any worker. A failed dump leaves
the worker running: it is told to serve, cold.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from dynamo_vllm.contract.config import Config
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
    identity,
)
from dynamo_vllm.supervisor.checkpoint.store import (
    Busy,
    CheckpointStore,
    StoreError,
    make_private,
    read_metadata,
)
from dynamo_vllm.supervisor.checkpoint.watcher import MarkerWatcher
from dynamo_vllm.supervisor.metrics import CheckpointMetrics
from dynamo_vllm.supervisor.workers import WorkerHandle, WorkerSpec

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
IMAGES = "images"
METRICS = "metrics"
# Names a restored worker takes from the supervisor of now (CRIU brings back the old ones).
CONTEXT_ENV = (Env.SUPERVISOR_PID, Env.INSTANCE, Env.DISCOVERY_DIR, Env.ETCD_ENDPOINTS)


def store_root(config: Config, runtime_dir: Path, instance: str) -> Path:
    """checkpoint.store, else `$STATE_DIRECTORY/checkpoints/<instance>` under systemd (the
    state directory is shared by the instances), else beside the runtime files."""
    if config.checkpoint.store:
        return Path(config.checkpoint.store)
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(state) / "checkpoints" / instance if state else runtime_dir / "checkpoints"


# Free space below which a failed dump is put down to a full store.
FULL_BELOW = 16 * 2**20


def _free_bytes(path: Path) -> int:
    try:
        info = os.statvfs(path)
    except OSError:
        return FULL_BELOW
    return info.f_bavail * info.f_frsize


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _reap(pids: list[int], timeout: float = 10.0) -> None:
    """Wait until the dumped processes are gone, so that a restore finds their pids free.
    The engine processes are ours to reap (re-parented to the subreaper); the worker
    itself is reaped by asyncio, which spawned it."""
    deadline = time.monotonic() + timeout
    root, pending = pids[0], set(pids)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            if pid == root:
                done = not _alive(pid)
            else:
                try:
                    done = os.waitpid(pid, os.WNOHANG)[0] == pid
                except ChildProcessError:
                    done = not _alive(pid)
            if done:
                pending.discard(pid)
        if pending:
            await asyncio.sleep(0.05)


class CheckpointCoordinator:
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
            self.unavailable = await asyncio.to_thread(self.checkpointer.check)
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
                await self._left_waiting(worker)
        self._count_stored()

    async def assign(self, spec: WorkerSpec, gpu_names: dict[int, str]) -> None:
        """Hash and control directory of one worker spec (a new config gets new ones)."""
        document = await asyncio.to_thread(
            identity, self.config, spec.index, spec.port, spec.gpus, spec.cpus,
            spec.python, self._engine, accelerator(gpu_names, spec.gpus))
        spec.checkpoint_hash = checkpoint_hash(document)
        spec.control_dir = self.control_root / spec.name
        spec.control_dir.mkdir(mode=0o700, exist_ok=True)
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
            # The image has the metric files mapped at their path: put them back first.
            handle.fresh_metrics_dir()
            if (path / METRICS).is_dir():
                shutil.copytree(path / METRICS, spec.metrics_dir, dirs_exist_ok=True,
                                symlinks=True)
            pid = await self.checkpointer.restore(path / IMAGES, self.work_root / spec.name,
                                                  dict(metadata.get("stdio") or {}))
        except (StoreError, OSError) as exc:
            raise CheckpointError(str(exc)) from None
        handle.adopt(pid)
        handle.restore_started = started
        self._answer(spec)
        log.info("worker %s: restored from checkpoint %s in %.2f s (criu); waking it",
                 spec.name, spec.checkpoint_hash, time.monotonic() - started)

    def restore_failed(self, handle: WorkerHandle, exc: Exception) -> None:
        spec = handle.spec
        log.error("worker %s: restore from checkpoint %s failed: %s; starting cold and "
                  "discarding the checkpoint", spec.name, spec.checkpoint_hash, exc)
        self.metrics.restores.labels(worker=spec.name, result="cold_start").inc()
        self._event(f"worker {spec.name} restore failed, cold start: {exc}")
        with contextlib.suppress(StoreError, OSError):
            self.store.remove(spec.checkpoint_hash)
        self._count_stored()
        if self.config.checkpoint.auto and spec.checkpoint_hash not in self._restore_failed:
            log.error("worker %s: no automatic checkpoint of %s again until the supervisor "
                      "restarts (`dynamo-vllm checkpoint` still takes one)", spec.name,
                      spec.checkpoint_hash)
        self._restore_failed.add(spec.checkpoint_hash)

    def started(self, handle: WorkerHandle) -> None:
        self.metrics.restored.labels(worker=handle.name).set(1 if handle.restored else 0)

    def serving(self, handle: WorkerHandle) -> None:
        """The worker serves: a restore, if it was one, is done."""
        if handle.restored and handle.restore_started is not None:
            seconds = time.monotonic() - handle.restore_started
            handle.restore_started = None
            self.metrics.restore_duration.labels(worker=handle.name).set(seconds)
            self.metrics.restores.labels(worker=handle.name, result="restored").inc()
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
            self._tasks[worker] = asyncio.create_task(self._on_ready(handle),
                                                      name=f"checkpoint-worker{worker}")

    async def _on_ready(self, handle: WorkerHandle) -> None:
        spec = handle.spec
        assert spec.control_dir is not None
        try:
            content = read_marker(spec.control_dir, Marker.READY)
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
            result = self._result(spec.name, "failed", f"{type(exc).__name__}: {exc}")
        if result["result"] == "taken":
            # The dump ended the worker; its supervising task restores it from the store.
            handle.restart_requested = True
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
            return self._result(name, "failed", f"the worker's hash {marker_hash} is not its "
                                                f"spec's {wanted} (config changed); not taken")
        if self.unavailable:
            return self._result(name, "failed", f"checkpoints unavailable: {self.unavailable}")
        if self.store.has(wanted):
            return self._result(name, "skipped", f"checkpoint {wanted} is stored already")
        try:
            staging = self.store.begin(wanted)
        except Busy as exc:
            return self._result(name, "skipped", str(exc))
        except (StoreError, OSError) as exc:
            return self._result(name, "failed", str(exc))
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
                "identity": self.identities.get(name, {}),
            })
        except Exception as exc:
            # Before the partial dump is removed: a full filesystem also cuts CRIU's own
            # log short, so its words may not say why.
            free = _free_bytes(staging.path)
            self._keep_log(staging.path / IMAGES / "dump.log", name)
            staging.abort()
            if not isinstance(exc, CheckpointError | StoreError | OSError):
                raise
            reason = str(exc)
            if (isinstance(exc, OSError) and exc.errno == 28) or free < FULL_BELOW:
                reason = (f"no space left on the checkpoint store's filesystem "
                          f"({free / 2**20:.0f} MiB free at the failure): {reason}")
            return self._result(name, "failed", reason)
        if not leave_running and dump.pids:
            await _reap(dump.pids)
        seconds = time.monotonic() - started
        self.metrics.duration.labels(worker=name).set(seconds)
        self.metrics.size.labels(worker=name).set(entry.size_bytes)
        removed = self.store.prune({s.spec.checkpoint_hash for s in self.handles.values()})
        if removed:
            log.info("checkpoint store: removed %s (checkpoint.keep = %d)", ", ".join(removed),
                     self.store.keep)
        self._count_stored()
        return self._result(name, "taken", f"checkpoint {wanted} stored in {seconds:.1f} s "
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

    def _result(self, worker: str, result: str, message: str, **extra: Any) -> dict[str, Any]:
        self.metrics.checkpoints.labels(worker=worker, result=result).inc()
        text = f"worker {worker} checkpoint {result}: {message}"
        (log.error if result == "failed" else log.info)("%s", text)
        self._event(text)
        return {"worker": worker, "result": result, "message": message, **extra}

    def _answer(self, spec: WorkerSpec) -> None:
        """Tell the worker to go on: the environment of now, then `restore-complete`."""
        assert spec.control_dir is not None
        env = spec.environment(dict(os.environ))
        context = {name: env.get(name) for name in CONTEXT_ENV}
        try:
            spec.control_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_marker(spec.control_dir, Marker.RESTORE_CONTEXT,
                         restore_context_document(context))
            write_marker(spec.control_dir, Marker.RESTORE_COMPLETE, b"restored")
        except OSError as exc:
            log.error("worker %s: cannot write %s: %s (it serves after checkpoint.timeout)",
                      spec.name, Marker.RESTORE_COMPLETE, exc)

    async def _left_waiting(self, worker: str) -> None:
        """A worker of a previous supervisor waits at its ready marker: take its checkpoint
        (which ends it) so that this supervisor restores it as its own child."""
        directory = self.control_root / worker
        try:
            content = read_marker(directory, Marker.READY)
            ready = parse_ready(content or b"")
        except MarkerError as exc:
            log.warning("worker %s: left-over %s", worker, exc)
            self.metrics.marker_errors.inc()
            remove_markers(directory, Marker.ALL)
            return
        pid = int(ready["pid"])
        if not _alive(pid):
            log.info("worker %s: a stale %s (pid %d is gone); removed", worker, Marker.READY, pid)
            remove_markers(directory, Marker.ALL)
            return
        spec = self.specs.get(worker)
        if spec is not None and spec.checkpoint_hash == ready["hash"]:
            log.info("worker %s: found waiting at its ready marker (pid %d, left by a previous "
                     "supervisor)", worker, pid)
            result = await self.take(spec, pid, leave_running=False, marker_hash=ready["hash"])
            if result["result"] == "taken":
                remove_markers(directory, Marker.ALL)
                return
        log.warning("worker %s: ending pid %d, left waiting by a previous supervisor", worker,
                    pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        remove_markers(directory, Marker.ALL)

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
            return 200, self._result(worker, "skipped",
                                     f"checkpoint {spec.checkpoint_hash} is stored already",
                                     hash=spec.checkpoint_hash)
        if not handle.serving:
            return 409, {"error": f"worker {worker} is {handle.phase.value}; a checkpoint is "
                                  "taken while it serves"}
        if worker in self._waiters:
            return 409, {"error": f"a checkpoint of worker {worker} is being taken"}
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[worker] = waiter
        try:
            code, body = await http_client.post_json(spec.host, spec.port, Route.ENGINE_SNAPSHOT,
                                                      {}, 10.0)
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
        return (200 if result["result"] != "failed" else 503), result

    def request_restore(self, worker: str) -> tuple[int, dict[str, Any]]:
        """POST /restore: restart the worker from its checkpoint."""
        handle = self.handles.get(worker)
        if handle is None:
            return 404, {"error": f"no worker {worker}"}
        if not self.can_restore(handle.spec):
            why = self.unavailable or f"no checkpoint stored for its hash " \
                                      f"{handle.spec.checkpoint_hash}"
            return 409, {"error": f"worker {worker} cannot be restored: {why}"}
        handle.restart_requested = True
        asyncio.get_running_loop().create_task(handle.stop(self.config.workers.stop_timeout))
        return 202, {"worker": worker, "result": "restoring",
                     "message": f"worker {worker} stops and is restored from "
                                f"{handle.spec.checkpoint_hash}"}

    # ------------------------------------------------------------ reporting

    def _event(self, text: str) -> None:
        self.last_event = text
        self.last_event_at = time.monotonic()

    def _count_stored(self) -> None:
        with contextlib.suppress(OSError):
            self.metrics.stored.set(sum(1 for e in self.store.entries() if e.state == "complete"))

    def describe(self) -> dict[str, Any]:
        return {"available": self.unavailable is None, "unavailable_reason": self.unavailable,
                "store": str(self.store.root), "last_event": self.last_event or None}
