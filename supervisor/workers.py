"""A process handle that owns one worker: its phase (an explicit state machine), how it is
spawned, signalled, reaped and cleaned.

Each worker runs in its own session and process group, so the whole tree (the worker, its
EngineCore and vLLM Worker processes) can be killed at once; vLLM's EngineCore does not
watch its parent, and a worker killed alone would leave it holding memory.

Every change of phase goes through a method that checks the move against
`phases.TRANSITIONS` and raises IllegalTransition otherwise; no other module assigns the
handle's lifecycle fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field

from dynamo_vllm.contract import journal
from dynamo_vllm.contract.discovery.backends import DiscoveryBackend, DiscoveryUnavailable
from dynamo_vllm.contract.protocol import ExitCode, WorkerState
from dynamo_vllm.supervisor import metric_files
from dynamo_vllm.supervisor import shm as shared_memory
from dynamo_vllm.supervisor.phases import LIVE, Phase, RestartReason, check_transition
from dynamo_vllm.supervisor.restart_policy import RestartPolicy
from dynamo_vllm.supervisor.worker_process import RestoredProcess, WorkerProcess, WorkerSpec

log = logging.getLogger(__name__)

# What the worker says while it still loads or waits (counted against start_timeout).
NOT_YET_SERVING = frozenset({WorkerState.LOADING, WorkerState.CHECKPOINT})
# What a worker says when it is on its way out by itself (bounded by stop_timeout).
ENDING = frozenset({WorkerState.DEAD, WorkerState.UNHEALTHY, WorkerState.DRAINING})
# Every value of the `state` a worker is shown in (/status, the state metric).
DISPLAY_STATES = tuple(dict.fromkeys(
    [*(p.value for p in Phase if p is not Phase.RUNNING), *(s.value for s in WorkerState)]))


@dataclass
class WorkerHandle:
    spec: WorkerSpec
    policy: RestartPolicy
    phase: Phase = Phase.STOPPED
    phase_since: float = 0.0
    # What the worker said of itself on its last /health answer, this life (None: nothing).
    reported: WorkerState | None = None
    reported_since: float = 0.0
    proc: WorkerProcess | None = None
    pid: int | None = None
    started_at: float | None = None
    serving_since: float | None = None
    lives: int = 0
    restarts: dict[str, int] = field(default_factory=dict)
    last_exit: str = ""
    last_exit_code: int | None = None
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

    # ------------------------------------------------------------ the state machine

    def _move(self, new: Phase) -> None:
        check_transition(self.name, self.phase, new)
        if new is not self.phase:
            self.phase = new
            self.phase_since = time.monotonic()

    def backing_off(self) -> None:
        self._move(Phase.BACKOFF)

    def observed(self, state: WorkerState | None, answered_ok: bool,
                 body: dict[str, object] | None) -> bool:
        """A /health answer (state None: not one a worker gives). Returns True when the
        worker has just begun to serve (its first time this life, or again after a sleep)."""
        self.poll_failures = 0
        if body is not None:
            self.health = body
        if state is None or self.phase not in LIVE:
            return False
        was_serving = self.serving
        if state is not self.reported:
            self.reported_since = time.monotonic()
        self.reported = state
        if self.phase in (Phase.STARTING, Phase.RESTORING):
            self._move(Phase.RUNNING)
        began = state is WorkerState.SERVING and answered_ok and self.serving and not was_serving
        if began:
            self.serving_since = time.monotonic()
            self.policy.record_success()
        return began

    def poll_failed(self) -> None:
        self.poll_failures += 1

    def stopping(self) -> None:
        self._move(Phase.STOPPING)

    def exited(self, code: int | None, description: str) -> None:
        self._move(Phase.EXITED)
        self.last_exit_code = code
        self.last_exit = description

    def stopped(self) -> None:
        self._move(Phase.STOPPED)

    def give_up(self, reason: str) -> None:
        self._move(Phase.FAILED)
        self.failed_reason = reason

    def restarting(self, reason: RestartReason) -> None:
        """A failed life is counted and the next one will follow (after a backoff)."""
        assert self.phase is Phase.EXITED, self.phase
        self.restarts[reason.value] = self.restarts.get(reason.value, 0) + 1
        self.last_restart_at = time.monotonic()
        self.last_restart_reason = self.last_exit

    def retry(self, policy: RestartPolicy) -> None:
        """A given-up worker gets a new chance (a reload)."""
        self._move(Phase.STOPPED)
        self.failed_reason = ""
        self.policy = policy

    def abandon(self, reason: str) -> None:
        """After a bug in its supervision: kill what runs and give the worker up, from any
        phase (the one move the table does not check: the state may be anything then)."""
        self.kill_group()
        self.phase = Phase.FAILED
        self.phase_since = time.monotonic()
        self.failed_reason = reason

    def request_stop(self) -> None:
        """Stop for good (a reload with fewer workers): its supervision ends."""
        self.stop_requested = True

    def request_restart(self, spec: WorkerSpec | None = None) -> None:
        """Start again after the next exit, with no backoff (a roll, a restore)."""
        if spec is not None:
            self.spec = spec
        self.restart_requested = True

    def take_restart_request(self) -> bool:
        requested, self.restart_requested = self.restart_requested, False
        return requested

    # ------------------------------------------------------------ what it is now

    @property
    def state(self) -> str:
        """What it is shown as: the worker's own word while it runs, else the phase."""
        if self.phase is Phase.RUNNING and self.reported is not None:
            return self.reported.value
        return self.phase.value

    @property
    def state_since(self) -> float:
        if self.phase is Phase.RUNNING:
            return max(self.phase_since, self.reported_since)
        return self.phase_since

    @property
    def running(self) -> bool:
        """This life's process is there and has not exited."""
        return self.proc is not None and self.proc.returncode is None

    @property
    def ending(self) -> bool:
        """The worker said it is going (dead, hung, draining): it exits on its own."""
        return self.phase is Phase.RUNNING and self.reported in ENDING

    @property
    def serving(self) -> bool:
        return self.phase is Phase.RUNNING and self.reported is WorkerState.SERVING

    @property
    def available(self) -> bool:
        """Serving, or asleep on purpose (an operator's choice, not a failure)."""
        return self.phase is Phase.RUNNING and self.reported in (WorkerState.SERVING,
                                                                 WorkerState.SLEEPING)

    @property
    def failed(self) -> bool:
        return self.phase is Phase.FAILED

    @property
    def failed_for_config(self) -> bool:
        """Given up because the worker said its config is wrong (exit 78)."""
        return self.failed and self.last_exit_code == ExitCode.CONFIG

    @property
    def loading(self) -> bool:
        """Coming up: spawned, restored, or loading its model (start_timeout applies)."""
        return self.phase in (Phase.STARTING, Phase.RESTORING) or (
            self.phase is Phase.RUNNING and self.reported in NOT_YET_SERVING)

    @property
    def in_checkpoint(self) -> bool:
        """Paused at its ready marker, or being dumped (CRIU freezes it)."""
        return self.phase is Phase.RUNNING and self.reported is WorkerState.CHECKPOINT

    # ------------------------------------------------------------ its files

    async def drop_discovery_record(self, discovery: DiscoveryBackend) -> None:
        """A worker that died cannot remove its own record: do it for it."""
        try:
            await discovery.delete(self.spec.index)
        except DiscoveryUnavailable as exc:
            log.warning("worker %s: its record stays until its lease expires (deleting it "
                        "failed: %s)", self.name, exc)

    def fresh_life_dirs(self) -> None:
        """New, empty, private directories for this life's metric files and sockets (a
        restore binds the image's sockets at their paths again: the directory must be
        there, and empty)."""
        for directory in (self.spec.metrics_dir, self.spec.socket_dir):
            if directory is None:
                continue
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(mode=0o700, parents=True)
            if self.spec.account is not None:
                self.spec.account.let_in(directory.parent)
            self.spec.own_dir(directory)

    def drop_metrics_dir(self) -> None:
        shutil.rmtree(self.spec.metrics_dir, ignore_errors=True)

    def repair_metrics_dir(self) -> int | None:
        """Put back this life's metric directory if something removed it; returns how many
        files the tree still held and got linked back, None when nothing was missing."""
        if not self.running or self.pid is None or self.spec.metrics_dir.is_dir():
            return None
        relinked = metric_files.restore_directory(self.spec.metrics_dir,
                                                  shared_memory.tree_pids(self.pid))
        self.spec.own_dir(self.spec.metrics_dir)
        return relinked

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

    async def spawn(self, base_env: dict[str, str],
                    extra_env: dict[str, str] | None = None) -> None:
        """Start the worker cold; `extra_env` is what the checkpoint coordinator tells this
        life (its control directory, snapshot mode)."""
        self.spec.extra_env = dict(extra_env or {})
        self.fresh_life_dirs()
        proc = await asyncio.create_subprocess_exec(
            *self.spec.command(),
            env=self.spec.environment(base_env),
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        self._started(proc, Phase.STARTING, restored=False)
        log.info("worker %s started (pid %d, port %d%s)", self.name, proc.pid,
                 self.spec.port, f", GPUs {self.spec.gpus}" if self.spec.gpus else "",
                 extra=journal.fields(self.name))

    def adopt(self, pid: int, restore_started: float) -> None:
        """Take on a worker restored from a checkpoint (already our child)."""
        self._started(RestoredProcess(pid), Phase.RESTORING, restored=True)
        self.restore_started = restore_started
        log.info("worker %s restored (pid %d, port %d)", self.name, pid, self.spec.port)

    def restore_done(self) -> float | None:
        """Seconds from the start of the restore to serving, once; None if not restored."""
        if not self.restored or self.restore_started is None:
            return None
        seconds = time.monotonic() - self.restore_started
        self.restore_started = None
        return seconds

    def _started(self, proc: WorkerProcess, phase: Phase, restored: bool) -> None:
        self._move(phase)
        self.proc = proc
        self.pid = proc.pid
        self.started_at = time.monotonic()
        self.serving_since = None
        self.reported = None
        self.poll_failures = 0
        self.health = {}
        self.lives += 1
        self.restored = restored

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
        self.stopping()
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
            "state": self.state,
            "phase": self.phase.value,
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
