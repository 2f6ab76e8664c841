"""The supervisor: the unit's main process. Spawns workers, watches them, tells systemd.

One asyncio loop. Each worker has an observed supervising task (`supervision.supervise`:
spawn, watch, restart with backoff, give up on a crash loop); the main loop asks
`readiness.readiness` what to tell systemd (READY, WATCHDOG, stop) from what those tasks
see, and says it. Signal handlers only set flags, as in gunicorn's arbiter. Route handlers
live in `handlers`, the HTTP transport in `http`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from dynamo_vllm.contract.config import Config
from dynamo_vllm.contract.discovery.backends import Document, backend_for
from dynamo_vllm.contract.discovery.etcd import EtcdDiscovery
from dynamo_vllm.contract.engine_venv import engine_python
from dynamo_vllm.contract.labels import worker_labels
from dynamo_vllm.contract.protocol import ExitCode, Route
from dynamo_vllm.supervisor.control_token import open_token, with_default_token
from dynamo_vllm.supervisor.devices import assign, detect_gpus, split_cpus
from dynamo_vllm.supervisor.frontend import FrontendChild, frontend_args_problem
from dynamo_vllm.supervisor.frontend_metrics import FrontendCollector
from dynamo_vllm.supervisor.handlers import Routes, target_group
from dynamo_vllm.supervisor.housekeeping import reap_orphans, repair_dirs
from dynamo_vllm.supervisor.http import StatusServer
from dynamo_vllm.supervisor.metrics import (
    CheckpointMetrics,
    GpuCollector,
    GuardedCollectors,
    NodeCollector,
    Scrape,
    SupervisorMetrics,
)
from dynamo_vllm.supervisor.notify import Notifier
from dynamo_vllm.supervisor.phases import Phase, RestartReason
from dynamo_vllm.supervisor.privilege import prepare_for_workers, worker_account
from dynamo_vllm.supervisor.readiness import FrontendView, Sent, Settings, WorkerView, readiness
from dynamo_vllm.supervisor.reload import ReloadRecord, reload
from dynamo_vllm.supervisor.report import status_document, status_text
from dynamo_vllm.supervisor.restart_policy import RestartPolicy
from dynamo_vllm.supervisor.startup import StartupError, port_free
from dynamo_vllm.supervisor.supervision import supervise
from dynamo_vllm.supervisor.tasks import observed
from dynamo_vllm.supervisor.worker_process import WorkerSpec
from dynamo_vllm.supervisor.worker_series import WorkerSeries
from dynamo_vllm.supervisor.workers import DISPLAY_STATES, WorkerHandle

if TYPE_CHECKING:
    from dynamo_vllm.supervisor.checkpoint.coordinator import CheckpointCoordinator

log = logging.getLogger(__name__)

TICK_S = 0.5
# How much start-up time each EXTEND_TIMEOUT_USEC asks for, and how often it is sent.
EXTEND_BY_S = 60.0
EXTEND_EVERY_S = 20.0


class Supervisor:
    def __init__(self, config: Config, runtime_dir: Path, config_path: Path | None = None,
                 notifier: Notifier | None = None, instance: str = ""):
        config = with_default_token(config, runtime_dir)
        self.config = config
        # What the listener, checkpointing and the frontend run with until a restart.
        self.started_config = config
        self.reloads = ReloadRecord()
        self.instance = instance or config.served_name
        self.config_path = config_path or Path(config.source)
        self.runtime_dir = runtime_dir
        self.notifier = notifier or Notifier()
        self.discovery = backend_for(config, self.instance, runtime_dir / "endpoints")
        self.handles: list[WorkerHandle] = []
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.stopping = False
        self.ready = False
        self.sent = Sent()
        self.last_ping = 0.0
        self.last_extend = 0.0
        self.exit_code: ExitCode = ExitCode.STOPPED
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._reload_task: asyncio.Task[None] | None = None
        self._snapshot: dict[str, object] = {"ready": False, "status": "starting",
                                             "workers": []}
        self.registry = CollectorRegistry()
        self.metrics = SupervisorMetrics(self.registry, DISPLAY_STATES)
        collectors: dict[str, Callable[[], Iterable[Metric]]] = {
            "node": NodeCollector().collect}
        gpus = GpuCollector()
        if gpus.present:  # no GPU: no GPU series and no errors
            collectors["gpu"] = gpus.collect
        self.frontend = FrontendChild(config.workers.python or engine_python() or "",
                                      self.policy()) if config.frontend.enabled else None
        if self.frontend is not None:
            collectors["frontend"] = FrontendCollector(self.frontend, lambda: (
                f"http://{self.config.frontend.host}:{self.config.frontend.port}/metrics"
            )).collect
        guarded = GuardedCollectors(collectors, outside=["workers"])
        self.registry.register(guarded)
        self.scrape = Scrape(self.registry, guarded, WorkerSeries(
            self._metrics_dirs, lambda: worker_labels(self.config, warn=False)).render)
        self.server: StatusServer | None = None
        self._target_publisher: EtcdDiscovery | None = None
        self.chrek: CheckpointCoordinator | None = None
        if config.checkpoint.enabled:
            # Imported here: CRIU's side costs a supervisor without checkpoints ~2 MiB RSS.
            from dynamo_vllm.supervisor.checkpoint.coordinator import CheckpointCoordinator
            self.chrek = CheckpointCoordinator(config, runtime_dir, self.instance,
                                               CheckpointMetrics(self.registry))
        self._zombies: set[int] = set()
        # Under a root supervisor, the account the workers and the frontend run as.
        self.account = worker_account(config.workers.user)
        self.account_env: dict[str, str] = {}

    # ---------------------------------------------------------------- set-up

    @property
    def effective_config_path(self) -> Path:
        return self.runtime_dir / "config.toml"

    def write_effective_config(self) -> None:
        """Workers read this snapshot, not the operator's file, so a file edited without a
        reload never reaches a worker that happens to restart."""
        tmp = self.effective_config_path.with_suffix(".toml.tmp")
        tmp.write_text(tomli_w.dumps(self.config.to_dict()))
        if self.account is not None:
            self.account.let_in(tmp, 0o640)
        os.replace(tmp, self.effective_config_path)

    def specs(self, config: Config) -> list[WorkerSpec]:
        gpus = config.workers.gpus if config.workers.gpus is not None else detect_gpus()
        try:
            groups = assign(config.workers.count, config.workers.gpus_per_worker, gpus)
        except ValueError as exc:
            raise StartupError(f"workers.gpus_per_worker: {exc}") from None
        cpus = (split_cpus(config.workers.count, sorted(os.sched_getaffinity(0)))
                if config.workers.gpus_per_worker == 0 and config.workers.count > 1
                else [[] for _ in range(config.workers.count)])
        return [WorkerSpec(index=i, host=config.workers.host, port=config.worker_port(i),
                           gpus=groups[i], cpus=cpus[i],
                           metrics_dir=self.runtime_dir / "metrics" / f"worker{i}",
                           socket_dir=self.runtime_dir / "sockets" / f"worker{i}",
                           python=config.workers.python or engine_python() or "",
                           config_path=self.effective_config_path,
                           instance=self.instance, discovery_dir=self.discovery.directory,
                           account=self.account, account_env=self.account_env)
                for i in range(config.workers.count)]

    async def _publish_target(self) -> None:
        """Where the backend has a fleet view (etcd): this instance's scrape target, under a
        lease, for fleet service discovery."""
        self._target_publisher = self.discovery.target_publisher()
        if self._target_publisher is not None:
            await self._target_publisher.register(
                Document(target_group(self.config, self.instance)))

    def policy(self) -> RestartPolicy:
        return RestartPolicy.of(self.config.workers)

    def _check_ports(self, specs: list[WorkerSpec]) -> None:
        busy = [f"{s.host}:{s.port} (worker {s.index})" for s in specs
                if not port_free(s.host, s.port)]
        front = self.config.frontend
        if front.enabled and not port_free(front.host, front.port):
            busy.append(f"{front.host}:{front.port} (frontend.port)")
        if busy:
            raise StartupError(f"workers.base_port: in use: {', '.join(busy)}")

    def _metrics_dirs(self) -> dict[str, str]:
        return {h.name: str(h.spec.metrics_dir) for h in self.handles if h.running}

    # ---------------------------------------------------------------- running

    async def run(self) -> ExitCode:
        loop = asyncio.get_running_loop()
        self.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        discovery_dir = self.discovery.directory
        if discovery_dir is not None:
            # Made here, so `dynamo-vllm endpoints` finds it before any worker serves.
            try:
                discovery_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            except OSError as exc:
                raise StartupError(f"discovery.path: cannot create {discovery_dir}: "
                                   f"{exc.strerror or exc}") from None
        if self.account is not None:
            self.account_env = prepare_for_workers(self.account, self.runtime_dir,
                                                   self.config, discovery_dir)
            if self.frontend is not None:
                self.frontend.account, self.frontend.account_env = self.account, self.account_env
        specs = self.specs(self.config)
        if self.chrek is not None:
            # Before the port check: a worker left waiting for a checkpoint holds its port.
            await self.chrek.prepare(specs, await asyncio.to_thread(self.chrek.gpu_names))
        self._check_ports(specs)
        if self.frontend is not None:
            problem = await asyncio.to_thread(frontend_args_problem, self.config,
                                              self.frontend.python)
            if problem:
                raise StartupError(problem)
        try:
            self.server = StatusServer(self.config.metrics.host, self.config.metrics.port,
                                       self.scrape, lambda: self._snapshot, Routes(self),
                                       loop, self.config.checkpoint.timeout + 60,
                                       self.config.workers.control_from_network,
                                       open_token(self.config, self.runtime_dir, self.account))
        except OSError as exc:
            raise StartupError(f"metrics.port: cannot listen on {self.config.metrics.host}:"
                               f"{self.config.metrics.port}: {exc.strerror or exc}") from None
        self.server.start()
        await self._publish_target()
        self.write_effective_config()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        base = f"http://{self.config.metrics.host}:{self.server.port}"
        log.info("supervisor %d: %d worker(s) of %s; metrics at %s%s, status at %s%s",
                 os.getpid(), self.config.workers.count, self.config.served_name, base,
                 Route.METRICS, base, Route.STATUS)
        self.metrics.workers_desired.set(self.config.workers.count)
        self.metrics.min_ready.set(self.config.min_ready)
        for spec in specs:
            self.add_worker(spec)
        if (frontend := self.frontend) is not None:
            self.tasks[-1] = observed(frontend.run(self), "frontend", lambda exc: frontend.kill())
        try:
            await self._main_loop()
        finally:
            await self._shutdown()
        return self.exit_code

    def add_worker(self, spec: WorkerSpec) -> WorkerHandle:
        handle = WorkerHandle(spec=spec, policy=self.policy())
        self.metrics.init_worker(handle.name, [r.value for r in RestartReason])
        if self.chrek is not None:
            self.chrek.watch(handle)
        self.metrics.set_worker_state(handle.name, handle.state)
        self.handles.append(handle)
        self.supervise(handle)
        return handle

    def supervise(self, handle: WorkerHandle) -> None:
        def bug(exc: BaseException) -> None:
            # A bug in the worker's supervision: never leave its engine running unwatched.
            handle.abandon(f"supervisor error: {type(exc).__name__}: {exc}")

        self.tasks[handle.spec.index] = observed(supervise(handle, self),
                                                 f"supervise-worker{handle.name}", bug)

    def request_stop(self, why: str) -> None:
        if not self.stopping:
            log.info("stopping on %s", why)
        self.stopping = True
        self._stop.set()

    async def pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less when the service stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _main_loop(self) -> None:
        self.notifier.status(f"starting {self.config.workers.count} worker(s)")
        while not self._stop.is_set():
            reloading = self._reload_task is not None and not self._reload_task.done()
            if self._reload_requested.is_set() and not reloading:
                # A task of its own: the loop keeps ticking (and pinging the watchdog) while
                # workers roll. A SIGHUP during a reload is kept for when it ends.
                self._reload_requested.clear()
                self._reload_task = observed(reload(self), "reload", self._reload_crashed)
            self._tick()
            repair_dirs(self.handles, self.chrek, self.metrics)
            if self.chrek is not None:
                self._zombies = reap_orphans(self.handles, self._zombies)
            await self.pause(TICK_S)

    def status_line(self, now: float) -> str:
        """What STATUS= says now (report.status_text, with the last checkpoint event)."""
        event = (self.chrek.last_event, self.chrek.last_event_at) if self.chrek else None
        text = status_text(self.handles, now, event)
        if self.frontend is not None:
            text += f"; frontend {self.frontend.state}"
        return text + self.reloads.pending_text()

    def _tick(self) -> None:
        now = time.monotonic()
        for handle in self.handles:
            self.metrics.set_worker_state(handle.name, handle.state)
        text = self.status_line(now)
        interval = self.notifier.watchdog_interval
        verdict = readiness(
            now,
            [WorkerView(available=h.available, serving=h.serving, failed=h.failed,
                        failed_for_config=h.failed_for_config)
             for h in self.handles],
            Settings(self.config.min_ready, self.config.watchdog.unready_grace,
                     watchdog=interval is not None,
                     rolling=self._reload_task is not None and not self._reload_task.done()),
            self.sent, FrontendView(self.frontend.serving, self.frontend.failed)
            if self.frontend is not None else None)
        self.sent, self.ready = verdict.sent, verdict.ready
        self.metrics.workers_serving.set(verdict.serving)
        self.metrics.ready.set(1 if verdict.ready else 0)
        if verdict.send_ready:
            self.metrics.last_ready.set(time.time())
            log.info("ready: %s", text)
            self.notifier.ready(text)
        if verdict.became_unready:
            log.warning("below min_ready (%d): %s", self.config.min_ready, text)
        self.notifier.status(text)
        if not self.sent.ready_sent and now - self.last_extend >= EXTEND_EVERY_S and any(
                h.loading or h.phase is Phase.BACKOFF for h in self.handles):
            # Models load for minutes; ask for more start time while they make progress.
            self.last_extend = now
            self.notifier.extend_timeout(EXTEND_BY_S)
        if interval is not None and now - self.last_ping >= interval:
            self.last_ping = now
            if verdict.healthy:
                self.notifier.watchdog()
                self.metrics.watchdog_pings.inc()
            else:
                self.metrics.watchdog_withheld.inc()
                log.error("not sending WATCHDOG=1: %s", text)
        if verdict.exit_code is not None:
            self.exit_code = verdict.exit_code
            if verdict.all_failed:
                log.error("every worker has been given up: %s", text)
            self.request_stop(verdict.exit_reason)
        self._snapshot = status_document(
            self.config, self.handles, text, self.ready, now,
            {"enabled": interval is not None, "pings": self.notifier.watchdog_pings},
            self.chrek.describe() if self.chrek is not None else None)
        self._snapshot["reload"] = self.reloads.as_dict()
        if self.frontend is not None:
            self._snapshot["frontend"] = self.frontend.describe(now)

    # ---------------------------------------------------------------- reload and stop

    def _reload_crashed(self, exc: BaseException) -> None:
        # reload() reports its own failures; this is for a bug there. The unit must not be
        # left in "reloading": READY=1 again, with what happened.
        self.notifier.ready(f"reload failed ({type(exc).__name__}: {exc}); see the log")

    async def _shutdown(self) -> None:
        self.stopping = True
        if self._reload_task is not None:
            self._reload_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reload_task
        self.notifier.stopping(f"stopping {len(self.handles)} worker(s)")
        if self.chrek is not None:
            self.chrek.stop()
        timeout = self.config.workers.stop_timeout
        if self.frontend is not None:
            # The front door first: nothing new is admitted while the workers drain.
            await self.frontend.stop(timeout)
        for handle, result in zip(self.handles, await asyncio.gather(
                *(h.stop(timeout) for h in self.handles), return_exceptions=True),
                strict=True):
            if isinstance(result, BaseException):
                log.error("worker %s: stopping it failed: %s", handle.name, result)
        # Each task's failure was logged by its done-callback; here they only end.
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        for handle in self.handles:
            await handle.clean_up_group(grace=2.0)
            handle.release_shm()
            handle.drop_metrics_dir()
        leftovers = _children()
        if leftovers:
            log.error("processes left after stopping the workers, killing them: %s", leftovers)
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._target_publisher is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._target_publisher.close(), 5.0)
        if self.server is not None:
            self.server.stop()
        log.info("stopped")


def _children() -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process().children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []
