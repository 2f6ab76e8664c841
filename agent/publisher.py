"""A vLLM stat-logger factory that publishes the engine gauges and marks engine progress.

vLLM calls `factory(vllm_config, engine_index)` once per data-parallel engine of the
`AsyncLLM`; every rank gets an `EnginePublisher` (its gauges carry the rank), which also
hands the load to Dynamo's router when the worker is a Dynamo member. `record()` runs on the
front-end's output handler after every engine step, which also makes it the cheapest proof
that the engine is making progress.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from vllm.v1.metrics.loggers import StatLoggerBase

from dynamo_vllm.agent.metrics import EngineGauges
from dynamo_vllm.agent.stall import StepTimes
from dynamo_vllm.agent.status import WorkerStatus

log = logging.getLogger(__name__)


class LoadSink(Protocol):
    """Where a rank's KV cache usage goes after every engine step (Dynamo's router)."""

    def publish_load(self, dp_rank: int, cache_usage: float) -> None: ...


class EnginePublisher(StatLoggerBase):
    def __init__(self, vllm_config: Any, engine_index: int, gauges: EngineGauges,
                 status: WorkerStatus, load: LoadSink | None = None,
                 steps: StepTimes | None = None):
        self.vllm_config = vllm_config
        self.load = load
        self.steps = steps
        self.dp_rank = engine_index
        self.gauges = gauges
        self.status = status
        self.total_blocks: int | None = None

    def _read_total_blocks(self) -> int | None:
        blocks = getattr(self.vllm_config.cache_config, "num_gpu_blocks", None)
        return int(blocks) if blocks else None

    def log_engine_initialized(self) -> None:
        self.total_blocks = self._read_total_blocks()
        self.gauges.set_engine(self.dp_rank, total_blocks=self.total_blocks or 0, cache_usage=0.0,
                               running=0, waiting=0)

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0, *args: Any, **kwargs: Any) -> None:
        if iteration_stats is not None:
            self.status.progressed()
        if scheduler_stats is None:
            return
        running, waiting = int(scheduler_stats.num_running_reqs), \
            int(scheduler_stats.num_waiting_reqs)
        if self.steps is not None:
            self.steps.stepped(busy=running + waiting > 0)
        if self.total_blocks is None:
            self.total_blocks = self._read_total_blocks()
        usage = float(scheduler_stats.kv_cache_usage)
        if self.load is not None:
            self.load.publish_load(self.dp_rank, usage)
        self.gauges.set_engine(
            self.dp_rank,
            total_blocks=self.total_blocks,
            cache_usage=usage,
            running=running,
            waiting=waiting,
        )


class StatLoggerFactory:
    """Callable handed to `AsyncLLM(stat_loggers=[...])`; vLLM wraps it per engine."""

    def __init__(self, gauges: EngineGauges, status: WorkerStatus, load: LoadSink | None = None,
                 steps: StepTimes | None = None):
        self.gauges = gauges
        self.status = status
        self.load = load
        self.steps = steps
        self.created: dict[int, StatLoggerBase] = {}

    def __call__(self, vllm_config: Any, engine_index: int = 0) -> StatLoggerBase:
        logger = EnginePublisher(vllm_config, engine_index, self.gauges, self.status, self.load,
                                 self.steps)
        self.created[engine_index] = logger
        return logger
