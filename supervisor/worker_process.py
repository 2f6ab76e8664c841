"""What a worker process is: how it is started (its command and environment, `WorkerSpec`)
and, for a worker restored by CRIU, how the supervisor waits on it (`RestoredProcess`)."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dynamo_vllm.contract.protocol import Env
from dynamo_vllm.supervisor.notify import SYSTEMD_ENV
from dynamo_vllm.supervisor.privilege import WorkerAccount

# vLLM's CPU backend: the cores a CPU engine's threads are bound to.
CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


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
    socket_dir: Path | None = None
    # Checkpoint/restore: the worker's control directory, and what its checkpoint is.
    control_dir: Path | None = None
    checkpoint_hash: str = ""
    # Set by the checkpoint coordinator before each spawn.
    extra_env: dict[str, str] = field(default_factory=dict)
    # The account the worker runs as when the supervisor is root (supervisor/privilege.py),
    # and the home and caches it gets then.
    account: WorkerAccount | None = None
    account_env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.index)

    @property
    def owner(self) -> tuple[int, int] | None:
        """(uid, gid) of the worker's account when it is not the supervisor's."""
        return (self.account.uid, self.account.gid) if self.account is not None else None

    def own_dir(self, path: Path) -> None:
        """Make `path` (0700) the worker's when it runs as another account."""
        if self.account is not None:
            self.account.hand_over(path, 0o700)

    def command(self) -> list[str]:
        drop = self.account.command_prefix() if self.account is not None else []
        return [*drop, self.python or sys.executable, "-m", "dynamo_vllm.agent",
                "--config", str(self.config_path), "--index", str(self.index)]

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in base.items() if k not in SYSTEMD_ENV}
        env[Env.PROMETHEUS_MULTIPROC_DIR] = str(self.metrics_dir)
        env[Env.SUPERVISOR_PID] = str(os.getpid())
        if self.instance:
            env[Env.INSTANCE] = self.instance
        if self.discovery_dir is not None:
            env[Env.DISCOVERY_DIR] = str(self.discovery_dir)
        if self.socket_dir is not None:
            env[Env.SOCKET_DIR] = str(self.socket_dir)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.gpus)
        if self.cpus and CPU_BIND_ENV not in base:
            env[CPU_BIND_ENV] = env[Env.WORKER_CPUS] = ",".join(str(c) for c in self.cpus)
        for name, value in Env.ENGINE_DEFAULTS.items():
            env.setdefault(name, value)
        env.update(self.account_env)
        env.update(self.extra_env)
        return env
