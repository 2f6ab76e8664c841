from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from dynamo_vllm.agent.metrics import EngineGauges
from dynamo_vllm.contract.labels import merge_labels
from dynamo_vllm.contract.protocol import WorkerState


def test_user_labels_never_replace_automatic_ones() -> None:
    merged = merge_labels({"model": "tiny", "dynamo_namespace": "ns"},
                          {"model": "other", "rack": "r1"})
    assert merged == {"model": "tiny", "dynamo_namespace": "ns", "rack": "r1"}


@pytest.mark.parametrize("reserved", ["le", "quantile"])
def test_reserved_labels_are_refused(reserved: str) -> None:
    with pytest.raises(ValueError, match="reserved"):
        merge_labels({"model": "tiny"}, {reserved: "x"})


def test_gauges_render_with_labels_and_state() -> None:
    registry = CollectorRegistry()
    gauges = EngineGauges({"model": "tiny", "rack": "r1"}, registry=registry)
    gauges.set_engine(0, total_blocks=512, cache_usage=0.25, running=3, waiting=1)
    gauges.set_state(WorkerState.SERVING)
    gauges.canary_result(True, 0.01)
    text = generate_latest(registry).decode()
    assert 'dynamo_component_total_blocks{dp_rank="0",model="tiny",rack="r1"} 512.0' in text
    assert 'dynamo_component_gpu_cache_usage_percent{dp_rank="0",model="tiny",rack="r1"} 0.25' \
        in text
    assert 'dynamo_component_health_state{model="tiny",rack="r1",state="serving"} 1.0' in text
    assert 'dynamo_component_health_state{model="tiny",rack="r1",state="loading"} 0.0' in text
    assert 'dynamo_component_canary_checks_total{model="tiny",rack="r1",result="ok"} 1.0' in text
