"""The supervisor: the unit's main process. Spawns workers, watches them, tells systemd.

One asyncio loop. Each worker has a supervising task (spawn, watch, restart with backoff,
give up on a crash loop); the main loop derives readiness, `STATUS=` and the watchdog from
what those tasks see. Signal handlers only set flags, as in gunicorn's arbiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import tomli_w
from prometheus_client import CollectorRegistry

from dynamo_vllm.contract import config as config_module
from dynamo_vllm.contract.config import Config, worker_view
from dynamo_vllm.contract.discovery.etcd import (
    EtcdDiscovery,
    instance_prefix,
    list_records,
    list_target_groups,
    target_key,
)
from dynamo_vllm.contract.discovery.etcd_gateway import EtcdError, EtcdGateway
from dynamo_vllm.contract.discovery.file import read_records
from dynamo_vllm.contract.engine_venv import engine_python
from dynamo_vllm.contract.gate import TokenError, load_token
from dynamo_vllm.contract.protocol import ExitCode, Route
from dynamo_vllm.supervisor import http_client
from dynamo_vllm.supervisor.checkpoint.coordinator import CheckpointCoordinator
from dynamo_vllm.supervisor.checkpoint.criu import CheckpointError
from dynamo_vllm.supervisor.checkpoint.identity import gpu_names
from dynamo_vllm.supervisor.devices import assign, detect_gpus, split_cpus
from dynamo_vllm.supervisor.http import StatusServer, Unavailable
from dynamo_vllm.supervisor.metrics import (
    CheckpointMetrics,
    GpuCollector,
    GuardedCollectors,
    NodeCollector,
    SupervisorMetrics,
    WorkerFilesCollector,
)
from dynamo_vllm.supervisor.notify import Notifier
from dynamo_vllm.supervisor.restart_policy import NO_RESTART, RestartPolicy, restart_reason
from dynamo_vllm.supervisor.workers import HEALTH_STATES, Phase, WorkerHandle, WorkerSpec

log = logging.getLogger(__name__)

TICK_S = 0.5
# How much start-up time each EXTEND_TIMEOUT_USEC asks for, and how often it is sent.
EXTEND_BY_S = 60.0
EXTEND_EVERY_S = 20.0
RESTART_REASONS = ("engine_dead", "engine_hung", "worker_hung", "start_timeout",
                   "stop_timeout", "checkpoint_timeout", "exited", "crashed", "killed")
# How long a checkpoint/restore event stays in STATUS=.
EVENT_SHOWN_S = 300.0


class StartupError(Exception):
    """Found before anything is spawned (a port in use, GPUs that do not exist)."""


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def ago(seconds: float) -> str:
    return f"{duration(seconds)} ago"


class Supervisor:
    def __init__(self, config: Config, runtime_dir: Path, config_path: Path | None = None,
                 notifier: Notifier | None = None, instance: str = ""):
        self.config = config
        self.instance = instance or config.served_name
        self.config_path = config_path or Path(config.source)
        self.runtime_dir = runtime_dir
        self.notifier = notifier or Notifier()
        self.handles: list[WorkerHandle] = []
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.stopping = False
        self.ready_sent = False
        self.ready = False
        self.unready_since: float | None = None
        self.last_ping = 0.0
        self.last_extend = 0.0
        self.exit_code: ExitCode = ExitCode.STOPPED
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._reload_task: asyncio.Task[None] | None = None
        self._snapshot: dict[str, Any] = {"ready": False, "status": "starting", "workers": []}
        self.registry = CollectorRegistry()
        self.metrics = SupervisorMetrics(self.registry, [p.value for p in Phase])
        collectors = {"node": NodeCollector().collect,
                      "workers": WorkerFilesCollector(self._metrics_dirs).collect}
        gpus = GpuCollector()
        if gpus.present:  # no GPU: no GPU series and no errors
            collectors["gpu"] = gpus.collect
        self.registry.register(GuardedCollectors(collectors))
        self.server: StatusServer | None = None
        self._target_publisher: EtcdDiscovery | None = None
        self.chrek: CheckpointCoordinator | None = None
        if config.checkpoint.enabled:
            self.chrek = CheckpointCoordinator(config, runtime_dir, self.instance,
                                               CheckpointMetrics(self.registry))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._zombies: set[int] = set()

    # ---------------------------------------------------------------- set-up

    @property
    def effective_config_path(self) -> Path:
        return self.runtime_dir / "config.toml"

    def _write_effective_config(self) -> None:
        """Workers read this snapshot, not the operator's file, so a file edited without a
        reload never reaches a worker that happens to restart."""
        tmp = self.effective_config_path.with_suffix(".toml.tmp")
        tmp.write_text(tomli_w.dumps(self.config.to_dict()))
        os.replace(tmp, self.effective_config_path)

    def _specs(self, config: Config) -> list[WorkerSpec]:
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
                           python=config.workers.python or engine_python() or "",
                           config_path=self.effective_config_path,
                           instance=self.instance, discovery_dir=self.discovery_dir(config))
                for i in range(config.workers.count)]

    def discovery_dir(self, config: Config) -> Path | None:
        if config.discovery.backend != "file":
            return None
        return Path(config.discovery.path) if config.discovery.path \
            else self.runtime_dir / "endpoints"

    def scrape_targets(self, fleet: bool = False) -> list[dict[str, Any]]:
        """This instance as a Prometheus HTTP-SD target group (prometheus/http-sd.yml), or
        with `fleet` and the etcd backend every instance that publishes one there."""
        if fleet and self.config.discovery.backend == "etcd":
            try:
                return asyncio.run(asyncio.wait_for(list_target_groups(self.config), 5.0))
            except (EtcdError, TimeoutError) as exc:
                # Prometheus keeps its last good list when SD fails; a 503 says why.
                raise Unavailable(f"etcd: {exc}") from exc
        return [self._target_group()]

    def _target_group(self) -> dict[str, Any]:
        metrics = self.config.metrics
        host = metrics.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        address = f"[{host}]:{metrics.port}" if ":" in host else f"{host}:{metrics.port}"
        return {"targets": [address],
                "labels": {"node": socket.gethostname(), "dynamo_vllm_instance": self.instance,
                           "__meta_dynamo_vllm_model": self.config.served_name,
                           "__meta_dynamo_vllm_workers": str(self.config.workers.count)}}

    async def _publish_target(self) -> None:
        """With etcd: put this instance's scrape target under a lease, for fleet SD."""
        if self.config.discovery.backend != "etcd":
            return
        self._target_publisher = EtcdDiscovery(
            EtcdGateway(self.config.discovery.etcd_urls),
            target_key(self.config, self.instance), self.config.discovery.lease_ttl)
        await self._target_publisher.register(_Document(self._target_group()))

    def endpoints(self) -> dict[str, Any]:
        """What discovery holds for this instance (called from the HTTP server's threads)."""
        config = self.config
        if config.discovery.backend == "etcd":
            urls = ", ".join(config.discovery.etcd_urls)
            where = f"{urls} {instance_prefix(config, self.instance)}"
            try:
                records = asyncio.run(asyncio.wait_for(list_records(config, self.instance), 5.0))
            except (EtcdError, TimeoutError) as exc:
                return {"backend": "etcd", "path": where, "endpoints": [],
                        "error": f"etcd: {exc}"}
            return {"backend": "etcd", "path": where, "endpoints": records}
        directory = self.discovery_dir(config)
        return {"backend": config.discovery.backend,
                "path": str(directory) if directory else None,
                "endpoints": read_records(directory) if directory else []}

    def _policy(self) -> RestartPolicy:
        w = self.config.workers
        return RestartPolicy(initial=w.restart_backoff, maximum=w.restart_backoff_max,
                             max_restarts=w.crash_loop_restarts, window=w.crash_loop_window)

    def _token(self) -> str | None:
        path = self.config.workers.control_token_file
        if not path:
            return None
        try:
            return load_token(path)
        except TokenError as exc:
            raise StartupError(f"workers.control_token_file: {exc}") from None

    def _check_ports(self, specs: list[WorkerSpec]) -> None:
        busy = [f"{s.host}:{s.port} (worker {s.index})" for s in specs
                if not _port_free(s.host, s.port)]
        if busy:
            raise StartupError(f"workers.base_port: in use: {', '.join(busy)}")

    def _metrics_dirs(self) -> dict[str, str]:
        return {h.name: str(h.spec.metrics_dir) for h in self.handles if h.running}

    # ---------------------------------------------------------------- running

    async def run(self) -> ExitCode:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        discovery_dir = self.discovery_dir(self.config)
        if discovery_dir is not None:
            # Made here, so `dynamo-vllm endpoints` finds it before any worker serves.
            try:
                discovery_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            except OSError as exc:
                raise StartupError(f"discovery.path: cannot create {discovery_dir}: "
                                   f"{exc.strerror or exc}") from None
        specs = self._specs(self.config)
        if self.chrek is not None:
            # Before the port check: a worker left waiting for a checkpoint holds its port.
            await self.chrek.prepare(specs, await asyncio.to_thread(gpu_names))
        self._check_ports(specs)
        try:
            self.server = StatusServer(self.config.metrics.host, self.config.metrics.port,
                                       self.registry, lambda: self._snapshot, self.endpoints,
                                       self.scrape_targets, self._control,
                                       self.config.workers.control_from_network,
                                       self._token())
        except OSError as exc:
            raise StartupError(f"metrics.port: cannot listen on {self.config.metrics.host}:"
                               f"{self.config.metrics.port}: {exc.strerror or exc}") from None
        self.server.start()
        await self._publish_target()
        self._write_effective_config()
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
            self._add_worker(spec)
        try:
            await self._main_loop()
        finally:
            await self._shutdown()
        return self.exit_code

    def _add_worker(self, spec: WorkerSpec) -> WorkerHandle:
        handle = WorkerHandle(spec=spec, policy=self._policy())
        self.metrics.init_worker(handle.name, RESTART_REASONS)
        if self.chrek is not None:
            self.chrek.watch(handle)
        self.metrics.set_worker_state(handle.name, handle.phase.value)
        self.handles.append(handle)
        self.tasks[spec.index] = asyncio.create_task(self._supervise(handle),
                                                     name=f"supervise-worker{spec.index}")
        return handle

    def request_stop(self, why: str) -> None:
        if not self.stopping:
            log.info("stopping on %s", why)
        self.stopping = True
        self._stop.set()

    async def _main_loop(self) -> None:
        self.notifier.status(f"starting {self.config.workers.count} worker(s)")
        while not self._stop.is_set():
            reloading = self._reload_task is not None and not self._reload_task.done()
            if self._reload_requested.is_set() and not reloading:
                # A task of its own: the loop keeps ticking (and pinging the watchdog) while
                # workers roll. A SIGHUP during a reload is kept for when it ends.
                self._reload_requested.clear()
                self._reload_task = asyncio.create_task(self._reload(), name="reload")
            self._tick()
            self._repair_dirs()
            if self.chrek is not None:
                self._reap_orphans()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), TICK_S)

    def _tick(self) -> None:
        now = time.monotonic()
        serving = sum(1 for h in self.handles if h.serving)
        min_ready = self.config.min_ready
        # A worker asleep on purpose is not a failure: it counts towards min_ready.
        self.ready = sum(1 for h in self.handles if h.available) >= min_ready
        self.metrics.workers_serving.set(serving)
        self.metrics.ready.set(1 if self.ready else 0)
        for handle in self.handles:
            self.metrics.set_worker_state(handle.name, handle.phase.value)
        text = self._status_text(serving, now)

        if self.ready:
            self.unready_since = None
            if not self.ready_sent:
                self.ready_sent = True
                self.metrics.last_ready.set(time.time())
                log.info("ready: %s", text)
                self.notifier.ready(text)
        elif self.unready_since is None:
            self.unready_since = now
            if self.ready_sent:
                log.warning("below min_ready (%d): %s", min_ready, text)
        self.notifier.status(text)

        if not self.ready_sent and now - self.last_extend >= EXTEND_EVERY_S and any(
                h.phase in (Phase.STARTING, Phase.LOADING, Phase.BACKOFF) for h in self.handles):
            # Models load for minutes; ask for more start time while they make progress.
            self.last_extend = now
            self.notifier.extend_timeout(EXTEND_BY_S)

        healthy = self._healthy_or_recovering(now)
        interval = self.notifier.watchdog_interval
        if interval is not None and now - self.last_ping >= interval:
            self.last_ping = now
            if healthy:
                self.notifier.watchdog()
                self.metrics.watchdog_pings.inc()
            else:
                self.metrics.watchdog_withheld.inc()
                log.error("not sending WATCHDOG=1: %s", text)
        if all(h.phase is Phase.FAILED for h in self.handles):
            bad_config = all(h.failed_reason.startswith("bad config") for h in self.handles)
            self.exit_code = ExitCode.CONFIG if bad_config else ExitCode.SERVICE_FAILED
            log.error("every worker has been given up: %s", text)
            self.request_stop("every worker failed")
        elif not healthy and interval is None:
            # No systemd watchdog to take over: exit so that Restart= does.
            self.exit_code = ExitCode.SERVICE_FAILED
            self.request_stop(f"fewer than {min_ready} workers serving for more than "
                              f"{self.config.watchdog.unready_grace:g} s")
        self._snapshot = self._build_snapshot(text, now)

    def _healthy_or_recovering(self, now: float) -> bool:
        if self.ready:
            return True
        if not self.ready_sent:
            # Starting: healthy while some worker can still come up within its start time.
            return any(h.phase is not Phase.FAILED for h in self.handles)
        since = self.unready_since if self.unready_since is not None else now
        return now - since < self.config.watchdog.unready_grace

    def _status_text(self, serving: int, now: float) -> str:
        parts = [f"{serving}/{len(self.handles)} workers serving"]
        sleeping = [h.name for h in self.handles if h.phase is Phase.SLEEPING]
        if sleeping:
            parts.append(f"asleep: worker {', '.join(sleeping)}")
        for h in self.handles:
            if h.phase in (Phase.STARTING, Phase.LOADING) and h.started_at:
                parts.append(f"worker {h.name} loading ({now - h.started_at:.0f} s)")
            elif h.phase in (Phase.RESTORING, Phase.CHECKPOINT):
                parts.append(f"worker {h.name} {h.phase.value} ({now - h.phase_since:.0f} s)")
            elif h.phase is Phase.FAILED:
                parts.append(f"worker {h.name} given up: {h.failed_reason}")
            elif h.phase is Phase.BACKOFF:
                parts.append(f"worker {h.name} restarting: {h.last_restart_reason}")
        recent = [h for h in self.handles if h.last_restart_at is not None
                  and h.phase is not Phase.FAILED]
        if recent:
            last = max(recent, key=lambda h: h.last_restart_at or 0.0)
            parts.append(f"worker {last.name} restarted {ago(now - (last.last_restart_at or now))}"
                         f": {last.last_restart_reason}")
        if self.chrek is not None and self.chrek.last_event:
            since, event = self.chrek.last_event_at, self.chrek.last_event
            if now - since < EVENT_SHOWN_S:
                parts.append(event)
        return "; ".join(parts)

    def _build_snapshot(self, text: str, now: float) -> dict[str, Any]:
        return {
            "instance": self.config.served_name,
            "model": self.config.model.path,
            "pid": os.getpid(),
            "ready": self.ready,
            "status": text,
            "min_ready": self.config.min_ready,
            "watchdog": {"enabled": self.notifier.watchdog_interval is not None,
                         "pings": self.notifier.watchdog_pings},
            "workers": [h.as_dict(now) for h in self.handles],
            "checkpoint": self.chrek.describe() if self.chrek is not None else None,
        }

    # ---------------------------------------------------------------- one worker

    async def _supervise(self, handle: WorkerHandle) -> None:
        while not self.stopping and not handle.stop_requested:
            delay = handle.policy.next_delay()
            if delay > 0:
                handle.set_phase(Phase.BACKOFF)
                log.info("worker %s restarts in %.1f s", handle.name, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self.stopping or handle.stop_requested:
                    break
            try:
                await self._start(handle)
            except OSError as exc:
                handle.set_phase(Phase.FAILED)
                handle.failed_reason = f"cannot start: {exc}"
                log.error("worker %s cannot start: %s", handle.name, exc)
                return
            code, killed_for = await self._watch(handle)
            handle.last_exit = ExitCode.describe(code)
            await handle.clean_up_group()
            handle.release_shm()
            handle.drop_metrics_dir()
            await handle.drop_discovery_record(self.config)
            if self.stopping or handle.stop_requested:
                handle.set_phase(Phase.STOPPED)
                break
            if handle.restart_requested:
                handle.restart_requested = False
                log.info("worker %s restarting on request", handle.name)
                continue
            if code == ExitCode.CHECKPOINTED and self.chrek is not None \
                    and killed_for is None:
                log.info("worker %s ended after its checkpoint; starting it again",
                         handle.name)
                continue
            if code in NO_RESTART and killed_for is None:
                handle.set_phase(Phase.FAILED)
                handle.failed_reason = f"{NO_RESTART[ExitCode(code)]} (exit {code}); see the log"
                log.error("worker %s will not be restarted: %s", handle.name,
                          handle.failed_reason)
                return
            reason = restart_reason(code, killed_for)
            handle.policy.record_failure()
            if handle.policy.crash_looping:
                handle.set_phase(Phase.FAILED)
                handle.failed_reason = (f"crash loop ({handle.policy.recent_failures} failures "
                                        f"in {self.config.workers.crash_loop_window:g} s), "
                                        f"last: {handle.last_exit}")
                log.error("worker %s given up: %s", handle.name, handle.failed_reason)
                return
            handle.restarts[reason] = handle.restarts.get(reason, 0) + 1
            handle.last_restart_at = time.monotonic()
            handle.last_restart_reason = handle.last_exit
            self.metrics.restarts.labels(worker=handle.name, reason=reason).inc()
            log.warning("worker %s ended (%s); restarting (reason %s)", handle.name,
                        handle.last_exit, reason)

    async def _start(self, handle: WorkerHandle) -> None:
        """Restore the worker from its checkpoint when there is one, else spawn it cold."""
        chrek = self.chrek
        if chrek is not None:
            if chrek.can_restore(handle.spec):
                try:
                    await chrek.restore(handle)
                    chrek.started(handle)
                    return
                except CheckpointError as exc:
                    chrek.restore_failed(handle, exc)
                    await handle.clean_up_group(grace=2.0)
            handle.spec.extra_env = chrek.spawn_env(handle.spec)
        await handle.spawn(dict(os.environ))
        if chrek is not None:
            chrek.started(handle)

    def _repair_dirs(self) -> None:
        """Put back runtime directories something removed while workers use them (a
        clean-up job, an operator): without them metrics vanish and restores fail."""
        for handle in self.handles:
            relinked = handle.repair_metrics_dir()
            if relinked is not None:
                self.metrics.dirs_recreated.labels(kind="metrics").inc()
                log.warning("worker %s: its metrics directory %s was removed; put back, with "
                            "the %d file(s) the worker still holds", handle.name,
                            handle.spec.metrics_dir, relinked)
        if self.chrek is not None:
            for path in self.chrek.repair_dirs():
                self.metrics.dirs_recreated.labels(kind="control").inc()
                log.warning("checkpoint control directory %s was removed; put back", path)

    def _reap_orphans(self) -> None:
        """As a child subreaper the supervisor inherits orphans (an engine process whose
        worker died): reap them. Only zombies seen twice, so that asyncio's own child
        watcher always collects its processes first."""
        import psutil

        ours = {h.proc.pid for h in self.handles if h.proc is not None}
        try:
            zombies = {p.pid for p in psutil.Process().children()
                       if p.pid not in ours and p.status() == psutil.STATUS_ZOMBIE}
        except psutil.Error:
            return
        for pid in zombies & self._zombies:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        self._zombies = zombies

    def _control(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST /checkpoint and /restore, from the HTTP server's thread."""
        if self.chrek is None:
            return 409, {"error": "checkpoints are off (checkpoint.enabled = false)"}
        worker = body.get("worker", 0)
        if isinstance(worker, bool) or not isinstance(worker, int):
            return 400, {"error": f"worker must be a worker index, got {worker!r}"}
        if set(body) - {"worker"}:
            return 400, {"error": f"unknown field {sorted(set(body) - {'worker'})[0]!r} "
                                  "(allowed: worker)"}
        chrek, loop = self.chrek, self._loop
        assert loop is not None

        async def call() -> tuple[int, dict[str, Any]]:
            if path == Route.CHECKPOINT:
                return await chrek.request_checkpoint(str(worker))
            return chrek.request_restore(str(worker))

        future = asyncio.run_coroutine_threadsafe(call(), loop)
        return future.result(timeout=self.config.checkpoint.timeout + 60)

    async def _watch(self, handle: WorkerHandle) -> tuple[int | None, str | None]:
        """Until the worker exits: poll /health, kill it if hung or too slow to start."""
        assert handle.proc is not None
        health = self.config.health
        exited = asyncio.ensure_future(handle.proc.wait())
        killed_for: str | None = None
        while True:
            # Restores take seconds: poll them closely, so that serving is seen at once.
            interval = health.poll_interval if handle.phase not in (
                Phase.RESTORING, Phase.CHECKPOINT) else min(health.poll_interval, 0.2)
            done, _ = await asyncio.wait({exited}, timeout=interval)
            if done:
                return exited.result(), killed_for
            if killed_for or handle.phase is Phase.STOPPING:
                continue
            verdict = await self._poll(handle)
            if verdict is not None:
                killed_for = verdict
                log.error("worker %s: %s; killing its process group", handle.name, verdict)
                handle.kill_group()

    async def _poll(self, handle: WorkerHandle) -> str | None:
        """One /health poll. Returns why the worker must be killed, or None."""
        health, now = self.config.health, time.monotonic()
        try:
            code, body = await http_client.get_json(handle.spec.host, handle.spec.port,
                                                    Route.HEALTH, health.poll_timeout)
        except (TimeoutError, http_client.PollError) as exc:
            # Before the port is bound "connection refused" is normal; a worker that said it
            # is ending is bounded by stop_timeout below instead.
            # A worker being dumped is frozen by CRIU: bounded by checkpoint_timeout instead.
            expected = handle.ending or handle.phase is Phase.CHECKPOINT or (
                isinstance(exc, http_client.PollError)
                and handle.phase in (Phase.STARTING, Phase.RESTORING))
            if not expected:
                handle.poll_failures += 1
                log.warning("worker %s: /health did not answer (%d/%d): %s", handle.name,
                            handle.poll_failures, health.poll_failures,
                            str(exc) or "timed out")
        else:
            handle.poll_failures = 0
            if isinstance(body, dict):
                handle.health = body
                phase = HEALTH_STATES.get(str(body.get("state")))
                if phase is Phase.SERVING and code == 200 and not handle.serving:
                    handle.serving_since = now
                    handle.policy.record_success()
                    if self.chrek is not None:
                        self.chrek.serving(handle)
                    if handle.started_at is not None:
                        self.metrics.start_seconds.labels(worker=handle.name).set(
                            now - handle.started_at)
                    log.info("worker %s serving on port %d", handle.name, handle.spec.port)
                if phase is not None:
                    handle.set_phase(phase)
                if phase is Phase.SERVING:
                    handle.sample_shm()
        if handle.poll_failures >= health.poll_failures:
            return "worker_hung"
        if handle.ending and now - handle.phase_since > self.config.workers.stop_timeout:
            return "stop_timeout"
        if (handle.phase in (Phase.STARTING, Phase.RESTORING, Phase.LOADING)
                and handle.started_at is not None
                and now - handle.started_at > self.config.workers.start_timeout):
            return "start_timeout"
        if handle.phase is Phase.CHECKPOINT and \
                now - handle.phase_since > self.config.checkpoint.timeout + 60:
            # The worker resumes by itself after checkpoint.timeout; this one does not.
            return "checkpoint_timeout"
        return None

    # ---------------------------------------------------------------- reload and stop

    async def _reload(self) -> None:
        self.notifier.reloading("reloading the config")
        try:
            new = config_module.load(self.config_path)
            specs = self._specs(new)
        except (config_module.ConfigError, StartupError) as exc:
            errors = exc.errors if isinstance(exc, config_module.ConfigError) else [str(exc)]
            for line in errors:
                log.error("reload refused: %s", line)
            self.notifier.ready(f"reload refused ({errors[0]}); running the previous config")
            return
        old = self.config
        worker_view_changed = worker_view(old) != worker_view(new)
        self.config = new
        if self.chrek is not None:
            self.chrek.config = new
            names = await asyncio.to_thread(gpu_names)
            for spec in specs:
                await self.chrek.assign(spec, names)
        self._write_effective_config()
        for handle in self.handles:
            handle.policy.initial = new.workers.restart_backoff
            handle.policy.maximum = new.workers.restart_backoff_max
            handle.policy.max_restarts = new.workers.crash_loop_restarts
            handle.policy.window = new.workers.crash_loop_window
        self.metrics.workers_desired.set(new.workers.count)
        self.metrics.min_ready.set(new.min_ready)
        logging.getLogger().setLevel(new.logging.level.upper())
        # Fewer workers: stop the surplus. More: start the new ones.
        for handle in [h for h in self.handles if h.spec.index >= new.workers.count]:
            handle.stop_requested = True
            await handle.stop(new.workers.stop_timeout)
            await self.tasks.pop(handle.spec.index)
            self.handles.remove(handle)
        for spec in specs[len(self.handles):]:
            self._add_worker(spec)
        if worker_view_changed:
            await self._roll(specs)
        self.notifier.ready(self._status_text(sum(h.serving for h in self.handles),
                                              time.monotonic()))
        log.info("reload done%s", " (workers rolled)" if worker_view_changed else "")

    async def _roll(self, specs: list[WorkerSpec]) -> None:
        """Restart workers one at a time, each serving again before the next goes."""
        for handle, spec in zip(list(self.handles), specs, strict=False):
            if self.stopping:
                return
            if handle.phase is Phase.FAILED:
                continue  # its task ended; a new config gets a new chance
            others = sum(1 for h in self.handles if h is not handle and h.serving)
            if others < self.config.min_ready:
                log.warning("rolling worker %s leaves %d serving (min_ready %d)", handle.name,
                            others, self.config.min_ready)
            handle.spec = spec
            handle.restart_requested = True
            await handle.stop(self.config.workers.stop_timeout)
            deadline = time.monotonic() + self.config.workers.start_timeout
            while not self.stopping and time.monotonic() < deadline:
                if handle.serving or handle.phase is Phase.FAILED:
                    break
                await asyncio.sleep(TICK_S)
        for handle in self.handles:
            if handle.phase is Phase.FAILED:
                handle.set_phase(Phase.STOPPED)
                handle.failed_reason = ""
                handle.policy = self._policy()
                self.tasks[handle.spec.index] = asyncio.create_task(self._supervise(handle))

    async def _shutdown(self) -> None:
        self.stopping = True
        if self._reload_task is not None:
            self._reload_task.cancel()
            await asyncio.gather(self._reload_task, return_exceptions=True)
        self.notifier.stopping(f"stopping {len(self.handles)} worker(s)")
        if self.chrek is not None:
            self.chrek.stop()
        timeout = self.config.workers.stop_timeout
        await asyncio.gather(*(h.stop(timeout) for h in self.handles), return_exceptions=True)
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


class _Document:
    """A JSON document to publish as it is."""

    def __init__(self, data: dict[str, Any]):
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        return self.data


def _children() -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process().children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []
