"""A process handle that owns one worker: how it is spawned, signalled, reaped and cleaned.

Each worker runs in its own session and process group, so the whole tree (the worker, its
EngineCore and vLLM Worker processes) can be killed at once; vLLM's EngineCore does not
watch its parent, and a worker killed alone would leave it holding memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dynamo_vllm.contract.config import Config
from dynamo_vllm.contract.discovery.etcd import delete_record
from dynamo_vllm.contract.discovery.etcd_gateway import EtcdError
from dynamo_vllm.contract.discovery.file import record_path
from dynamo_vllm.contract.protocol import Env
from dynamo_vllm.supervisor import metric_files
from dynamo_vllm.supervisor import shm as shared_memory
from dynamo_vllm.supervisor.notify import SYSTEMD_ENV
from dynamo_vllm.supervisor.restart_policy import RestartPolicy

log = logging.getLogger(__name__)

# vLLM's CPU backend: the cores a CPU engine's threads are bound to.
CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


class Phase(enum.StrEnum):
    """The supervisor's view of a worker; `serving` etc. come from the worker's /health."""

    STARTING = "starting"
    RESTORING = "restoring"
    LOADING = "loading"
    CHECKPOINT = "checkpoint"
    SERVING = "serving"
    SLEEPING = "sleeping"
    DRAINING = "draining"
    UNHEALTHY = "unhealthy"
    DEAD = "dead"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


# /health states a worker reports, mapped to phases.
HEALTH_STATES = {
    "loading": Phase.LOADING,
    "serving": Phase.SERVING,
    "draining": Phase.DRAINING,
    "sleeping": Phase.SLEEPING,
    "unhealthy": Phase.UNHEALTHY,
    "dead": Phase.DEAD,
    "checkpoint": Phase.CHECKPOINT,
}


class RestoredProcess:
    """A worker brought back by `criu restore --restore-detached`.

    criu exits once the tree runs; the tree's root is then re-parented to the supervisor,
    which is a child subreaper when checkpoints are on. So it is our child, and is reaped
    here: a pidfd says when it exits, `waitpid` collects its status.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)
        self._exited: asyncio.Future[int] | None = None

    async def wait(self) -> int:
        if self.returncode is not None:
            return self.returncode
        loop = asyncio.get_running_loop()
        if self._exited is None:
            self._exited = loop.create_future()
            loop.add_reader(self._pidfd, self._reap)
        return await asyncio.shield(self._exited)

    def _reap(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        try:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = 1  # not our child after all: it is gone, its status unknown
        self.returncode = code
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(code)


WorkerProcess = asyncio.subprocess.Process | RestoredProcess


@dataclass
class WorkerSpec:
    index: int
    host: str
    port: int
    gpus: list[int]
    cpus: list[int]
    metrics_dir: Path
    python: str
    config_path: Path
    instance: str = ""
    discovery_dir: Path | None = None
    # Checkpoint/restore: the worker's control directory, and what its checkpoint is.
    control_dir: Path | None = None
    checkpoint_hash: str = ""
    # Set by the checkpoint coordinator before each spawn.
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.index)

    def command(self) -> list[str]:
        return [self.python or sys.executable, "-m", "dynamo_vllm.agent",
                "--config", str(self.config_path), "--index", str(self.index)]

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in base.items() if k not in SYSTEMD_ENV}
        env[Env.PROMETHEUS_MULTIPROC_DIR] = str(self.metrics_dir)
        env[Env.SUPERVISOR_PID] = str(os.getpid())
        if self.instance:
            env[Env.INSTANCE] = self.instance
        if self.discovery_dir is not None:
            env[Env.DISCOVERY_DIR] = str(self.discovery_dir)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.gpus)
        if self.cpus and CPU_BIND_ENV not in base:
            env[CPU_BIND_ENV] = ",".join(str(c) for c in self.cpus)
        for name, value in Env.ENGINE_DEFAULTS.items():
            env.setdefault(name, value)
        env.update(self.extra_env)
        return env


@dataclass
class WorkerHandle:
    spec: WorkerSpec
    policy: RestartPolicy
    phase: Phase = Phase.STOPPED
    phase_since: float = 0.0
    proc: WorkerProcess | None = None
    pid: int | None = None
    started_at: float | None = None
    serving_since: float | None = None
    lives: int = 0
    restarts: dict[str, int] = field(default_factory=dict)
    last_exit: str = ""
    last_restart_at: float | None = None
    last_restart_reason: str = ""
    failed_reason: str = ""
    poll_failures: int = 0
    health: dict[str, object] = field(default_factory=dict)
    restart_requested: bool = False
    stop_requested: bool = False
    restored: bool = False
    restore_started: float | None = None
    # /dev/shm files this life's tree uses (sampled while it serves), removed when it ends.
    shm: set[str] = field(default_factory=set)
    shm_sampled_at: float = 0.0

    @property
    def name(self) -> str:
        return self.spec.name

    def set_phase(self, phase: Phase) -> None:
        if phase is not self.phase:
            self.phase = phase
            self.phase_since = time.monotonic()

    @property
    def running(self) -> bool:
        """This life's process is there and has not exited."""
        return self.proc is not None and self.proc.returncode is None

    @property
    def ending(self) -> bool:
        """The worker said it is going (dead, hung, draining): it exits on its own."""
        return self.phase in (Phase.DEAD, Phase.UNHEALTHY, Phase.DRAINING)

    @property
    def serving(self) -> bool:
        return self.phase is Phase.SERVING

    @property
    def available(self) -> bool:
        """Serving, or asleep on purpose (an operator's choice, not a failure)."""
        return self.phase in (Phase.SERVING, Phase.SLEEPING)

    async def drop_discovery_record(self, config: Config) -> None:
        """A worker that died cannot remove its own record: do it for it."""
        if self.spec.discovery_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(record_path(self.spec.discovery_dir, self.spec.instance,
                                      self.spec.index))
        elif config.discovery.backend == "etcd":
            try:
                await asyncio.wait_for(
                    delete_record(config, self.spec.instance, self.spec.index), 5.0)
            except (EtcdError, TimeoutError) as exc:
                log.warning("worker %s: its etcd key stays until its lease expires "
                            "(deleting it failed: %s)", self.name, exc)

    def fresh_metrics_dir(self) -> None:
        """A new, empty, private directory for this life's metric files."""
        shutil.rmtree(self.spec.metrics_dir, ignore_errors=True)
        self.spec.metrics_dir.mkdir(mode=0o700, parents=True)

    def drop_metrics_dir(self) -> None:
        shutil.rmtree(self.spec.metrics_dir, ignore_errors=True)

    def repair_metrics_dir(self) -> int | None:
        """Put back this life's metric directory if something removed it; returns how many
        files the tree still held and got linked back, None when nothing was missing."""
        if not self.running or self.pid is None or self.spec.metrics_dir.is_dir():
            return None
        return metric_files.restore_directory(self.spec.metrics_dir,
                                              shared_memory.tree_pids(self.pid))

    def sample_shm(self, every: float = 30.0) -> None:
        """Note the tree's /dev/shm files (vLLM creates its queues at engine start)."""
        now = time.monotonic()
        if self.pid is None or (self.shm and now - self.shm_sampled_at < every):
            return
        self.shm_sampled_at = now
        self.shm |= shared_memory.shm_files(shared_memory.tree_pids(self.pid))

    def release_shm(self) -> int:
        """After the tree is gone: remove the /dev/shm files it left (a clean stop left none)."""
        removed = shared_memory.remove(self.shm)
        self.shm = set()
        if removed:
            log.info("worker %s: removed %d shared-memory file(s) its engine left in /dev/shm",
                     self.name, removed)
        return removed

    async def spawn(self, base_env: dict[str, str]) -> None:
        self.fresh_metrics_dir()
        self.proc = await asyncio.create_subprocess_exec(
            *self.spec.command(),
            env=self.spec.environment(base_env),
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        self._started(Phase.STARTING, restored=False)
        log.info("worker %s started (pid %d, port %d%s)", self.name, self.proc.pid,
                 self.spec.port, f", GPUs {self.spec.gpus}" if self.spec.gpus else "")

    def adopt(self, pid: int) -> None:
        """Take on a worker restored from a checkpoint (already our child)."""
        self.proc = RestoredProcess(pid)
        self._started(Phase.RESTORING, restored=True)
        log.info("worker %s restored (pid %d, port %d)", self.name, pid, self.spec.port)

    def _started(self, phase: Phase, restored: bool) -> None:
        assert self.proc is not None
        self.pid = self.proc.pid
        self.started_at = time.monotonic()
        self.serving_since = None
        self.poll_failures = 0
        self.health = {}
        self.lives += 1
        self.restored = restored
        self.set_phase(phase)

    def signal_worker(self, sig: signal.Signals) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill_group(self) -> None:
        """SIGKILL every process of this worker's group (the worker and its engine)."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def group_alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    async def stop(self, timeout: float) -> int | None:
        """SIGTERM (the worker drains and shuts its engine down), then SIGKILL the group."""
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else None
        self.set_phase(Phase.STOPPING)
        self.signal_worker(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            log.warning("worker %s did not stop within %.0f s: killing its process group",
                        self.name, timeout)
            self.kill_group()
            return await self.proc.wait()

    async def clean_up_group(self, grace: float = 5.0) -> None:
        """After the worker exited: give its engine processes `grace` s, then kill them."""
        deadline = time.monotonic() + grace
        while self.group_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.group_alive():
            log.warning("worker %s left processes behind: killing its process group", self.name)
            self.kill_group()
            while self.group_alive() and time.monotonic() < deadline + 5:
                await asyncio.sleep(0.1)

    def as_dict(self, now: float | None = None) -> dict[str, object]:
        now = time.monotonic() if now is None else now
        return {
            "worker": self.spec.index,
            "pid": self.pid if self.running else None,
            "port": self.spec.port,
            "gpus": self.spec.gpus,
            "cpus": self.spec.cpus,
            "state": self.phase.value,
            "restarts": sum(self.restarts.values()),
            "restarts_by_reason": dict(self.restarts),
            "last_exit": self.last_exit,
            "failed_reason": self.failed_reason or None,
            "uptime_s": round(now - self.started_at, 1)
            if self.started_at and self.running else None,
            "serving_for_s": round(now - self.serving_since, 1) if self.serving_since else None,
            "health": self.health,
            "restored": self.restored,
            "checkpoint_hash": self.spec.checkpoint_hash or None,
        }
