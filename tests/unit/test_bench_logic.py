"""`dynamo-vllm bench`'s logic: length specs, quantiles, SLAs and the report."""

from __future__ import annotations

import random

import pytest

from dynamo_vllm.bench import report as bench_report
from dynamo_vllm.bench.loadgen import Lengths, LengthSpecError, quantile


def test_lengths() -> None:
    rng = random.Random(1)
    assert Lengths.parse("128").draw(rng) == 128
    uniform = Lengths.parse("uniform:4:8")
    assert {uniform.draw(rng) for _ in range(200)} == {4, 5, 6, 7, 8}
    assert all(Lengths.parse("normal:10:50").draw(rng) >= 1 for _ in range(200))
    assert str(uniform) == "uniform:4:8"
    for bad in ("0", "lots", "uniform:8:4", "uniform:0:4", "normal:0:1", "zipf:1:2", ""):
        with pytest.raises(LengthSpecError):
            Lengths.parse(bad)


def test_quantiles_interpolate() -> None:
    assert quantile([], 0.5) != quantile([], 0.5)  # NaN
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0, 2.0], 0.5) == 1.5
    assert quantile(list(map(float, range(101))), 0.99) == pytest.approx(99.0)


def test_sla_parsing() -> None:
    assert bench_report.parse_sla("ttft_p99=500ms, itl_p95=0.05s,e2e_p50=2") == {
        "ttft_p99": 0.5, "itl_p95": 0.05, "e2e_p50": 2.0}
    for bad in ("", "ttft=1s", "ttft_p99", "ttft_p99=fast", "tpot_p99=1ms"):
        with pytest.raises(bench_report.SlaError):
            bench_report.parse_sla(bad)


def level(name: str, tput: float, ttft_p99: float, errors: int = 0) -> dict:
    data = {"level": name, "output_tokens_per_s": tput, "errors": errors, "completed": 10,
            "requests": 10 + errors, "requests_per_s": 1.0}
    for metric in ("ttft", "itl", "e2e"):
        for q in ("p50", "p95", "p99"):
            data[f"{metric}_{q}_s"] = 0.01
    data["ttft_p99_s"] = ttft_p99
    return data


def test_the_highest_load_under_the_sla() -> None:
    levels = [level("c1", 100, 0.05), level("c2", 180, 0.09), level("c4", 300, 0.4),
              level("c8", 350, 0.05, errors=1)]
    sla = {"ttft_p99": 0.1}
    assert bench_report.best_under_sla(levels, sla)["level"] == "c2"  # type: ignore[index]
    assert bench_report.best_under_sla(levels, {"ttft_p99": 0.001}) is None
    table = bench_report.markdown(levels, sla)
    assert "| c2 ✓ |" in table and "| c4 ✗ |" in table and "| c8 ✗ |" in table
    assert "highest load that meets it: **c2**" in table
    assert table.splitlines()[1] == "|---|---|---|---|---|---|---|---|"
