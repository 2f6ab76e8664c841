"""The benchmarks' load generator: the one `dynamo-vllm bench` uses (supervisor/loadgen.py)."""

from __future__ import annotations

import statistics

from dynamo_vllm.bench.loadgen import Lengths, LoadResult, LoadSpec, quantile, run

__all__ = ["LoadResult", "median", "quantile", "run_load"]

PROMPT_TOKENS = 8


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def run_load(url: str, model: str, requests: int, concurrency: int,
                   max_tokens: int = 64) -> LoadResult:
    """`requests` streaming completions of `max_tokens` tokens (8-token prompts), at most
    `concurrency` at a time."""
    return await run(LoadSpec(targets=[url], model=model, requests=requests,
                              concurrency=concurrency,
                              input_len=Lengths("fixed", PROMPT_TOKENS),
                              output_len=Lengths("fixed", max_tokens)))
