"""GPU series through NVML, on a machine with an NVIDIA GPU (skipped where there is none).

The CI machines have no GPU; this runs where one is lent (see the issue notes), and the
no-GPU side (no GPU series, no errors) is checked by the supervisor's engine test.
"""

from __future__ import annotations

import glob
import re

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from dynamo_vllm.supervisor.metrics import GpuCollector, GuardedCollectors

pytestmark = pytest.mark.skipif(not glob.glob("/proc/driver/nvidia/gpus/*") and
                                not glob.glob("/dev/nvidia[0-9]*"),
                                reason="no NVIDIA GPU on this machine")


def test_nvml_gpu_series() -> None:
    pytest.importorskip("pynvml", reason="nvidia-ml-py (the gpu extra) is not installed")
    collector = GpuCollector()
    assert collector.present, "an NVIDIA device exists but NVML found no GPU"
    registry = CollectorRegistry()
    registry.register(GuardedCollectors({"gpu": collector.collect}))
    text = generate_latest(registry).decode()
    assert 'dynamo_agent_scrape_collector_success{collector="gpu"} 1.0' in text
    values = {}
    for name in ("utilization_ratio", "memory_used_bytes", "memory_total_bytes",
                 "temperature_celsius", "power_watts"):
        match = re.search(rf"^dynamo_agent_gpu_{name}{{(.*)}} (\S+)$", text, re.M)
        assert match, name
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        assert labels["gpu"] == "0" and labels["uuid"].startswith("GPU-") and labels["name"]
        values[name] = float(match.group(2))
    assert values["memory_total_bytes"] > 1e9
    assert 0 <= values["memory_used_bytes"] <= values["memory_total_bytes"]
    assert 0 <= values["utilization_ratio"] <= 1
    assert values["power_watts"] > 0
    print(text)
