"""The worker's own metrics: Dynamo's engine gauges plus canary and health series.

Created once per worker process, after `PROMETHEUS_MULTIPROC_DIR` is set, so they are
written to the worker's metrics directory beside vLLM's `vllm:*` families and a reader
that never imports vLLM (the supervisor) can serve them. Gauges use the `mostrecent`
mode: the directory is fresh for each worker life, so the newest value is the truth and
no `pid` label appears.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from dynamo_vllm.contract.protocol import Label, Metric, WorkerState

log = logging.getLogger(__name__)


class EngineGauges:
    """The worker's metric families, with the hierarchical labels fixed at creation."""

    def __init__(self, labels: Mapping[str, str], registry: CollectorRegistry = REGISTRY):
        self.labels = dict(labels)
        names = list(self.labels)
        ranked = [*names, Label.DP_RANK]
        self.total_blocks = Gauge(
            Metric.TOTAL_BLOCKS, "KV cache blocks of the engine.", ranked,
            multiprocess_mode="mostrecent", registry=registry)
        self.cache_usage = Gauge(
            Metric.CACHE_USAGE, "KV cache usage of the engine, as a fraction from 0 to 1.",
            ranked, multiprocess_mode="mostrecent", registry=registry)
        self.requests_running = Gauge(
            Metric.REQUESTS_RUNNING, "Requests the engine is running.", ranked,
            multiprocess_mode="mostrecent", registry=registry)
        self.requests_waiting = Gauge(
            Metric.REQUESTS_WAITING, "Requests waiting in the engine's queue.", ranked,
            multiprocess_mode="mostrecent", registry=registry)
        self.model_load_time = Gauge(
            Metric.MODEL_LOAD_TIME, "Seconds the engine took to start (load and warm up).",
            names, multiprocess_mode="mostrecent", registry=registry)
        self.canary_checks = Counter(
            Metric.CANARY_CHECKS, "Canary requests sent to the engine, by result.",
            [*names, "result"], registry=registry)
        self.canary_latency = Histogram(
            Metric.CANARY_LATENCY, "Seconds a successful canary request took.", names,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=registry)
        self.health_state = Gauge(
            Metric.HEALTH_STATE, "1 for the worker's current state, 0 for the others.",
            [*names, "state"], multiprocess_mode="mostrecent", registry=registry)
        self.discovery_errors = Counter(
            Metric.DISCOVERY_ERRORS, "Discovery operations that failed (etcd unreachable or "
            "refusing), by operation; the worker keeps serving and retries.",
            [*names, "operation"], registry=registry)
        for result in ("ok", "failed"):
            self.canary_checks.labels(**self.labels, result=result)

    def set_state(self, state: WorkerState) -> None:
        for candidate in WorkerState:
            self.health_state.labels(**self.labels, state=candidate.value).set(
                1 if candidate is state else 0)

    def set_engine(self, dp_rank: int, *, total_blocks: int | None = None,
                   cache_usage: float | None = None, running: int | None = None,
                   waiting: int | None = None) -> None:
        rank = {**self.labels, Label.DP_RANK: str(dp_rank)}
        if total_blocks is not None:
            self.total_blocks.labels(**rank).set(total_blocks)
        if cache_usage is not None:
            self.cache_usage.labels(**rank).set(cache_usage)
        if running is not None:
            self.requests_running.labels(**rank).set(running)
        if waiting is not None:
            self.requests_waiting.labels(**rank).set(waiting)

    def discovery_error(self, operation: str) -> None:
        self.discovery_errors.labels(**self.labels, operation=operation).inc()

    def canary_result(self, ok: bool, seconds: float | None = None) -> None:
        self.canary_checks.labels(**self.labels, result="ok" if ok else "failed").inc()
        if ok and seconds is not None:
            self.canary_latency.labels(**self.labels).observe(seconds)
