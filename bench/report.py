"""What `dynamo-vllm bench` reports: a summary per load level, as JSON for machines, a
Markdown table for people, PNG plots, and the highest load that meets an SLA."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynamo_vllm.bench.loadgen import LoadResult

QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
SLA_KEYS = tuple(f"{m}_{q}" for m in ("ttft", "itl", "e2e") for q, _ in QUANTILES)


class SlaError(ValueError):
    pass


def summary(result: LoadResult, level: str) -> dict[str, Any]:
    """One load level: counts, throughput, and latency quantiles in seconds."""
    spec = result.spec
    data: dict[str, Any] = {
        "level": level,
        "concurrency": spec.concurrency,
        "rate": spec.rate,
        "input_len": str(spec.input_len),
        "output_len": str(spec.output_len),
        "requests": len(result.results),
        "completed": len(result.ok),
        "errors": result.errors,
        "error_kinds": result.error_kinds(),
        "duration_s": round(result.wall, 3),
        "requests_per_s": round(result.requests_per_s, 3),
        "output_tokens_per_s": round(result.output_tokens_per_s, 2),
        "input_tokens": sum(r.prompt_tokens for r in result.ok),
        "output_tokens": sum(r.tokens for r in result.ok),
    }
    for metric in ("ttft", "itl", "e2e"):
        for name, q in QUANTILES:
            value = getattr(result, metric)(q)
            data[f"{metric}_{name}_s"] = None if math.isnan(value) else round(value, 6)
    data["ttft_values_s"] = sorted(r.ttft for r in result.ok if r.ttft is not None)
    return data


def parse_sla(text: str) -> dict[str, float]:
    """`ttft_p99=500ms,itl_p99=50ms` -> {"ttft_p99": 0.5, "itl_p99": 0.05} (seconds)."""
    limits: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in SLA_KEYS:
            raise SlaError(f"{part!r}: use KEY=VALUE with KEY one of {', '.join(SLA_KEYS)}")
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*", value)
        if not found:
            raise SlaError(f"{part!r}: the value must be a number of seconds, or end in ms or s")
        seconds = float(found.group(1)) / (1000 if found.group(2) == "ms" else 1)
        limits[key.strip()] = seconds
    if not limits:
        raise SlaError("an empty SLA: give at least one KEY=VALUE")
    return limits


def meets(level: Mapping[str, Any], sla: Mapping[str, float]) -> bool:
    if level["errors"]:
        return False
    for key, limit in sla.items():
        value = level.get(f"{key}_s")
        if value is None or value > limit:
            return False
    return True


def best_under_sla(levels: list[dict[str, Any]], sla: Mapping[str, float]
                   ) -> dict[str, Any] | None:
    """The level with the highest throughput among those that meet the SLA."""
    passing = [lv for lv in levels if meets(lv, sla)]
    return max(passing, key=lambda lv: lv["output_tokens_per_s"]) if passing else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def markdown(levels: list[dict[str, Any]], sla: Mapping[str, float] | None = None) -> str:
    head = ("| load | requests | errors | req/s | output tok/s | TTFT p50/p95/p99 ms | "
            "ITL p50/p95/p99 ms | e2e p50/p95/p99 ms |")
    lines = [head, "|---" * 8 + "|"]
    for lv in levels:
        lat = {m: " / ".join(_ms(lv[f"{m}_{q}_s"]) for q, _ in QUANTILES)
               for m in ("ttft", "itl", "e2e")}
        mark = " ✓" if sla and meets(lv, sla) else (" ✗" if sla else "")
        lines.append(f"| {lv['level']}{mark} | {lv['completed']}/{lv['requests']} | "
                     f"{lv['errors']} | {lv['requests_per_s']:.2f} | "
                     f"{lv['output_tokens_per_s']:.1f} | {lat['ttft']} | {lat['itl']} | "
                     f"{lat['e2e']} |")
    if sla:
        best = best_under_sla(levels, sla)
        limits = ", ".join(f"{k} ≤ {v * 1000:g} ms" for k, v in sla.items())
        lines.append("")
        lines.append(f"SLA {limits}: " + (f"highest load that meets it: **{best['level']}** "
                                          f"({best['output_tokens_per_s']:.1f} output tok/s)"
                                          if best else "no load level meets it"))
    return "\n".join(lines)


def document(levels: list[dict[str, Any]], sla: Mapping[str, float] | None,
             context: Mapping[str, Any]) -> dict[str, Any]:
    best = best_under_sla(levels, sla) if sla else None
    return {**context, "levels": levels, "sla": dict(sla) if sla else None,
            "best_under_sla": best["level"] if best else None}


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def plot(levels: list[dict[str, Any]], directory: Path, title: str) -> list[Path]:
    """latency-vs-throughput.png (over the levels) and ttft-cdf.png; needs matplotlib."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    throughput = [lv["output_tokens_per_s"] for lv in levels]
    for metric, marker in (("ttft", "o"), ("itl", "s"), ("e2e", "^")):
        for q, line in (("p50", "-"), ("p99", "--")):
            values = [(lv[f"{metric}_{q}_s"] or float("nan")) * 1000 for lv in levels]
            ax.plot(throughput, values, marker=marker, linestyle=line,
                    label=f"{metric.upper()} {q}")
    for lv, x in zip(levels, throughput, strict=True):
        ax.annotate(lv["level"], (x, (lv["e2e_p50_s"] or 0) * 1000), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("latency, ms (log)")
    ax.set_yscale("log")
    ax.set_title(f"Latency against throughput: {title}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(directory / "latency-vs-throughput.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lv in levels:
        values = [v * 1000 for v in lv["ttft_values_s"]]
        if values:
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, fractions, where="post", label=lv["level"])
    ax.set_xlabel("time to first token, ms")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"TTFT CDF: {title}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(directory / "ttft-cdf.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)
    return written
