"""The supervisor's one scrape target: node, GPU, supervisor and every worker's metrics.

The supervisor never sets `PROMETHEUS_MULTIPROC_DIR` for itself: its own metrics live in
an ordinary registry. Each worker writes to its own directory (fresh for each life); the
`WorkerSeries` (worker_series.py) renders them, and `Scrape` puts the body together: the
workers' families, then the registry's. A worker life's directory is removed when it ends,
so its series vanish with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dynamo_vllm.supervisor.checkpoint.results import RESTORE_COUNTED, CheckpointResult

log = logging.getLogger(__name__)
T = TypeVar("T")

PREFIX = "dynamo_agent"


class GuardedCollectors(Collector):
    """Runs the node, GPU and worker collectors so that one failing never breaks a scrape.

    After them it reports, for this very scrape, whether each worked
    (`dynamo_agent_scrape_collector_success`) and how many times each failed so far
    (`dynamo_agent_collector_errors_total`), as node_exporter does.
    """

    def __init__(self, collectors: Mapping[str, Callable[[], Iterable[Metric]]],
                 outside: Iterable[str] = ()):
        self.collectors = dict(collectors)
        # Parts of the scrape rendered outside the registry (`guard`), with their last result.
        self.outside = dict.fromkeys(outside, True)
        self.errors = {name: 0 for name in [*collectors, *self.outside]}

    def _attempt(self, name: str, produce: Callable[[], T]) -> T | None:
        try:
            return produce()
        except Exception as exc:  # a broken collector must never break the scrape
            log.warning("collector %s failed: %s", name, exc)
            self.errors[name] += 1
            return None

    def guard(self, name: str, produce: Callable[[], bytes]) -> bytes:
        """Runs a part of the scrape that is rendered outside the registry under the same
        rule: a failure costs its own series, is logged and counted."""
        text = self._attempt(name, produce)
        self.outside[name] = text is not None
        return text or b""

    def collect(self) -> Iterator[Metric]:
        success = GaugeMetricFamily(f"{PREFIX}_scrape_collector_success",
                                    "1 if the collector worked in this scrape.",
                                    labels=["collector"])
        for name, worked in self.outside.items():
            success.add_metric([name], 1 if worked else 0)
        for name, collect in self.collectors.items():
            metrics = self._attempt(name, _listing(collect))
            success.add_metric([name], 0 if metrics is None else 1)
            yield from metrics or []
        errors = CounterMetricFamily(f"{PREFIX}_collector_errors",
                                     "Errors while collecting metrics.", labels=["collector"])
        for name, count in self.errors.items():
            errors.add_metric([name], count)
        yield success
        yield errors


def _listing(collect: Callable[[], Iterable[Metric]]) -> Callable[[], list[Metric]]:
    return lambda: list(collect())


class Scrape:
    """One /metrics body, in two parts: the workers' text (`workers`, a WorkerSeries'
    render, the same bytes object while no worker changed), then the registry's families,
    which report this very scrape's success of the workers' part as a collector's."""

    def __init__(self, registry: CollectorRegistry, guarded: GuardedCollectors,
                 workers: Callable[[], bytes]):
        self.registry = registry
        self.guarded = guarded
        self.workers = workers
        # Scrapes run in a small pool: one at a time, so the success reported is this one's.
        self._lock = threading.Lock()

    def __call__(self) -> tuple[bytes, bytes]:
        with self._lock:
            workers = self.guarded.guard("workers", self.workers)
            return workers, generate_latest(self.registry)


class NodeCollector:
    """CPU, memory and load of the node, from psutil."""

    def __init__(self) -> None:
        psutil.cpu_percent(interval=None)  # the first call only sets the baseline

    def collect(self) -> list[Metric]:
        cpu = GaugeMetricFamily(f"{PREFIX}_node_cpu_utilization_ratio",
                                "CPU busy fraction since the last scrape, 0 to 1.")
        cpu.add_metric([], psutil.cpu_percent(interval=None) / 100.0)
        cores = GaugeMetricFamily(f"{PREFIX}_node_cpu_cores", "Logical CPUs of the node.")
        cores.add_metric([], float(psutil.cpu_count() or 0))
        mem = psutil.virtual_memory()
        total = GaugeMetricFamily(f"{PREFIX}_node_memory_total_bytes", "Memory of the node.")
        total.add_metric([], float(mem.total))
        available = GaugeMetricFamily(f"{PREFIX}_node_memory_available_bytes",
                                      "Memory available for new work.")
        available.add_metric([], float(mem.available))
        load = GaugeMetricFamily(f"{PREFIX}_node_load_average", "Load average.", labels=["period"])
        for period, value in zip(("1m", "5m", "15m"), os.getloadavg(), strict=True):
            load.add_metric([period], value)
        return [cpu, cores, total, available, load]


class GpuCollector:
    """NVIDIA GPUs through NVML (`nvidia-ml-py`). No driver or no library: no series."""

    def __init__(self) -> None:
        self.nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.count = pynvml.nvmlDeviceGetCount()
        except Exception as exc:  # ImportError, NVMLError (no driver, no GPU)
            log.info("no GPU metrics: %s", exc)
            self.nvml = None
            self.count = 0

    def _memory(self, handle: Any) -> Any:
        # The v2 query leaves driver-reserved memory out of `used`, as nvidia-smi does;
        # v1 counts it (about 500 MiB on an idle H100).
        nv = self.nvml
        version = getattr(nv, "nvmlMemory_v2", None)
        if version is not None:
            with contextlib.suppress(Exception):
                return nv.nvmlDeviceGetMemoryInfo(handle, version=version)
        return nv.nvmlDeviceGetMemoryInfo(handle)

    @property
    def present(self) -> bool:
        return bool(self.nvml and self.count)

    def collect(self) -> list[Metric]:
        nv = self.nvml
        labels = ["gpu", "uuid", "name"]
        util = GaugeMetricFamily(f"{PREFIX}_gpu_utilization_ratio",
                                 "GPU busy fraction over the driver's last sample period.",
                                 labels=labels)
        used = GaugeMetricFamily(f"{PREFIX}_gpu_memory_used_bytes", "GPU memory in use.",
                                 labels=labels)
        total = GaugeMetricFamily(f"{PREFIX}_gpu_memory_total_bytes", "GPU memory.",
                                  labels=labels)
        temp = GaugeMetricFamily(f"{PREFIX}_gpu_temperature_celsius", "GPU temperature.",
                                 labels=labels)
        power = GaugeMetricFamily(f"{PREFIX}_gpu_power_watts", "GPU power draw.", labels=labels)
        for index in range(self.count):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            name = nv.nvmlDeviceGetName(handle)
            uuid = nv.nvmlDeviceGetUUID(handle)
            key = [str(index), uuid if isinstance(uuid, str) else uuid.decode(),
                   name if isinstance(name, str) else name.decode()]
            rates = nv.nvmlDeviceGetUtilizationRates(handle)
            util.add_metric(key, rates.gpu / 100.0)
            memory = self._memory(handle)
            used.add_metric(key, float(memory.used))
            total.add_metric(key, float(memory.total))
            temp.add_metric(key, float(nv.nvmlDeviceGetTemperature(handle,
                                                                   nv.NVML_TEMPERATURE_GPU)))
            power.add_metric(key, nv.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        return [util, used, total, temp, power]


class SupervisorMetrics:
    """`dynamo_agent_*`: what the supervisor knows and does."""

    def __init__(self, registry: CollectorRegistry, states: Iterable[str]):
        self.states = list(states)
        self.worker_state = Gauge(f"{PREFIX}_worker_state",
                                  "1 for each worker's current state, 0 for the others.",
                                  ["worker", "state"], registry=registry)
        self.worker_up = Gauge(f"{PREFIX}_worker_up", "1 while the worker serves.", ["worker"],
                               registry=registry)
        self.restarts = Counter(f"{PREFIX}_worker_restarts",
                                "Worker restarts, by the reason the last life ended.",
                                ["worker", "reason"], registry=registry)
        self.start_seconds = Gauge(f"{PREFIX}_worker_start_duration_seconds",
                                   "Seconds the worker's last start took, spawn to serving.",
                                   ["worker"], registry=registry)
        self.workers_serving = Gauge(f"{PREFIX}_workers_serving", "Workers serving.",
                                     registry=registry)
        self.workers_desired = Gauge(f"{PREFIX}_workers_desired", "Workers configured.",
                                     registry=registry)
        self.min_ready = Gauge(f"{PREFIX}_workers_min_ready",
                               "Workers that must serve for the instance to be ready.",
                               registry=registry)
        self.ready = Gauge(f"{PREFIX}_ready", "1 while at least min_ready workers serve.",
                           registry=registry)
        self.last_ready = Gauge(f"{PREFIX}_last_ready_timestamp_seconds",
                                "Unix time the instance last became ready.", registry=registry)
        self.watchdog_pings = Counter(f"{PREFIX}_watchdog_pings",
                                      "WATCHDOG=1 notifications sent to systemd.",
                                      registry=registry)
        self.watchdog_withheld = Counter(f"{PREFIX}_watchdog_withheld",
                                         "Watchdog pings withheld because the service is "
                                         "unhealthy beyond its grace period.", registry=registry)
        self.dirs_recreated = Counter(f"{PREFIX}_directories_recreated",
                                      "Runtime directories (metrics, control) something removed "
                                      "under the supervisor, put back.", ["kind"],
                                      registry=registry)
        for kind in ("metrics", "control"):
            self.dirs_recreated.labels(kind=kind)
        self.started = Gauge(f"{PREFIX}_start_time_seconds", "Unix time the supervisor started.",
                             registry=registry)
        self.started.set(time.time())

    def set_worker_state(self, worker: str, state: str) -> None:
        for candidate in self.states:
            self.worker_state.labels(worker=worker, state=candidate).set(
                1 if candidate == state else 0)
        self.worker_up.labels(worker=worker).set(1 if state == "serving" else 0)

    def init_worker(self, worker: str, reasons: Iterable[str]) -> None:
        for reason in reasons:
            self.restarts.labels(worker=worker, reason=reason)


CHECKPOINT_RESULTS = tuple(r.value for r in CheckpointResult)
RESTORE_RESULTS = tuple(r.value for r in RESTORE_COUNTED)


class CheckpointMetrics:
    """`dynamo_agent_checkpoint_*` and `dynamo_agent_restore*`: checkpoint/restore (CHREK)."""

    def __init__(self, registry: CollectorRegistry):
        self.available = Gauge(f"{PREFIX}_checkpoint_available",
                               "1 when the checkpointer works on this host (criu check).",
                               registry=registry)
        self.checkpoints = Counter(f"{PREFIX}_checkpoints",
                                   "Checkpoints by result: taken, failed, or skipped (one for "
                                   "the hash was stored already).", ["worker", "result"],
                                   registry=registry)
        self.duration = Gauge(f"{PREFIX}_checkpoint_duration_seconds",
                              "Seconds the worker's last checkpoint took (dump and store).",
                              ["worker"], registry=registry)
        self.size = Gauge(f"{PREFIX}_checkpoint_size_bytes",
                          "Size of the worker's last checkpoint.", ["worker"], registry=registry)
        self.stored = Gauge(f"{PREFIX}_checkpoints_stored", "Complete checkpoints in the store.",
                            registry=registry)
        self.restores = Counter(f"{PREFIX}_restores",
                                "Restores by result: restored, or cold_start when a restore "
                                "failed and the worker started cold.", ["worker", "result"],
                                registry=registry)
        self.restore_duration = Gauge(f"{PREFIX}_restore_duration_seconds",
                                      "Seconds the worker's last restore took, from `criu "
                                      "restore` to serving.", ["worker"], registry=registry)
        self.restored = Gauge(f"{PREFIX}_worker_restored",
                              "1 when the worker's current life was restored from a "
                              "checkpoint, 0 when it started cold.", ["worker"],
                              registry=registry)
        self.marker_errors = Counter(f"{PREFIX}_marker_errors",
                                     "Malformed, symlinked or unexpected marker files, ignored.",
                                     registry=registry)

    def init_worker(self, worker: str) -> None:
        for result in CHECKPOINT_RESULTS:
            self.checkpoints.labels(worker=worker, result=result)
        for result in RESTORE_RESULTS:
            self.restores.labels(worker=worker, result=result)
        self.restored.labels(worker=worker).set(0)
