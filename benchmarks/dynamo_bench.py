"""Dynamo's frontend in front of the workers, measured with clients nobody here wrote.

    python -m benchmarks.dynamo_bench --model .tiny-model [--rounds 5] [--prompts 64]
                                      [--aiperf PATH/TO/aiperf]

AIPerf is not a dependency of the project (it pins its own stack); install it apart, e.g.
`python3 -m venv /tmp/aiperf && /tmp/aiperf/bin/pip install aiperf`, and pass its path.

One supervisor with two workers ([dynamo] enabled, file discovery) and two Dynamo frontends
on the same discovery, one round-robin and one KV-aware:

1. Overhead: worker 1 sleeps (level 0), so the frontend has one worker; vLLM's benchmark
   client (`vllm.benchmarks.serve`, random prompts of 64 tokens, 64 output tokens, 8
   concurrent) runs against the frontend and against worker 0's own port in alternation.
   Output tokens/s as a ratio, TTFT p50/p99 as differences.
2. KV-aware routing against round-robin: both workers awake, vLLM's `prefix_repetition`
   workload (4 prefixes of 384 tokens, 3 KV blocks on the CPU engine, each with 32-token
   suffixes), the workers' prefix caches cleared before each run. TTFT p50 and the prefix
   cache hit rate (both workers' `vllm:prefix_cache_hits` over `_queries`).
3. Cross-check: `dynamo-vllm bench`, vLLM's client and AIPerf (the tool Dynamo's tuning guide
   uses; give its path, it lives in a venv of its own) at one load level, the frontend in
   front of both workers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from benchmarks.worker_bench import ENV, machine
from tests.harness import SupervisorProcess, wait_for, write_config
from tests.harness.dynamo import (
    DynamoFrontend,
    dynamo_env,
    dynamo_node,
    file_instances,
    vllm_counter,
)

ENV_ALL = {**os.environ, **ENV}
VLLM_BENCH = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
              "from vllm.benchmarks import serve; p = FlexibleArgumentParser(); "
              "serve.add_cli_args(p); serve.main(p.parse_args(sys.argv[1:]))")


def vllm_bench(base: str, model: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    args = [sys.executable, "-c", VLLM_BENCH, "--backend", "openai", "--base-url", base,
            "--endpoint", "/v1/completions", "--model", "tiny", "--tokenizer", str(model),
            "--max-concurrency", "8", "--percentile-metrics", "ttft,tpot,itl",
            "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(out.parent),
            "--result-filename", out.name, "--seed", "0", *extra]
    subprocess.run(args, check=True, capture_output=True, timeout=900, env=ENV_ALL)
    return dict(json.loads(out.read_text()))




def prefix_counters(ports: list[int]) -> tuple[float, float]:
    return (sum(vllm_counter(port, "prefix_cache_hits") for port in ports),
            sum(vllm_counter(port, "prefix_cache_queries") for port in ports))


def control(port: int, route: str, body: dict[str, Any] | None = None) -> None:
    httpx.post(f"http://127.0.0.1:{port}/engine/{route}", json=body or {},
               timeout=60).raise_for_status()


class Setup:
    def __init__(self, model: Path, tmp: Path):
        self.file_kv = tmp / "dynamo-kv"
        self.file_kv.mkdir()
        spec = dynamo_node(
            model, file_kv=self.file_kv, workers={"count": 2}, health={"canary_idle": 60.0},
            engine={"max_model_len": 1024, "kv_cache_memory_bytes": 256 * 2**20})
        self.supervisor = SupervisorProcess(write_config(tmp / "tiny.toml", spec.config), tmp,
                                            spec.metrics_port, env=ENV)
        env = {**dynamo_env(self.file_kv), **ENV}
        self.rr = DynamoFrontend(tmp / "frontend-rr.log", "round-robin", env=env)
        self.kv = DynamoFrontend(tmp / "frontend-kv.log", "kv", env=env)
        self.ports = [spec.base_port, spec.base_port + 1]

    def __enter__(self) -> Setup:
        self.supervisor.wait_workers(lambda ws: len(ws) == 2 and all(
            w["state"] == "serving" for w in ws), 300, "both workers serving")
        for frontend in (self.rr, self.kv):
            frontend.wait_model("tiny", 60)
        wait_for(lambda: len(file_instances(self.file_kv)) == 2, 30, what="two instances")
        return self

    def __exit__(self, *exc: object) -> None:
        for process in (self.rr, self.kv, self.supervisor):
            process.cleanup()


RANDOM = ["--dataset-name", "random", "--random-input-len", "64", "--random-output-len", "64",
          "--ignore-eos"]


def overhead(setup: Setup, model: Path, tmp: Path, rounds: int, prompts: int) -> str:
    control(setup.ports[1], "sleep", {"level": 0})
    wait_for(lambda: len(file_instances(setup.file_kv)) == 1, 30, what="one instance")
    runs: dict[str, list[dict[str, Any]]] = {"frontend": [], "worker": []}
    for r in range(rounds):
        for name, base in (("frontend", setup.rr.base),
                           ("worker", f"http://127.0.0.1:{setup.ports[0]}")):
            runs[name].append(vllm_bench(base, model, tmp / f"{name}-{r}.json",
                                         [*RANDOM, "--num-prompts", str(prompts)]))
    control(setup.ports[1], "wake_up")

    def med(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    def cell(name: str, key: str) -> str:
        values = [run[key] for run in runs[name]]
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"
    rows = ["| path | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms |",
            "|---|---|---|---|---|"]
    for name in ("frontend", "worker"):
        rows.append(f"| {name} | {cell(name, 'output_throughput')} | "
                    f"{cell(name, 'median_ttft_ms')} | {cell(name, 'p99_ttft_ms')} | "
                    f"{cell(name, 'median_itl_ms')} |")
    ratio = med("frontend", "output_throughput") / med("worker", "output_throughput")
    rows.append("")
    rows.append(f"Frontend / worker output tokens/s: **{ratio:.3f}**; TTFT p50 "
                f"{med('frontend', 'median_ttft_ms') - med('worker', 'median_ttft_ms'):+.2f} "
                f"ms, p99 {med('frontend', 'p99_ttft_ms') - med('worker', 'p99_ttft_ms'):+.2f}"
                f" ms (median (min-max) of {rounds} alternating rounds of {prompts} requests,"
                " 8 concurrent).")
    return "\n".join(rows)


PREFIXED = ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "384",
            "--prefix-repetition-suffix-len", "32", "--prefix-repetition-num-prefixes", "4",
            "--prefix-repetition-output-len", "16"]


def routing(setup: Setup, model: Path, tmp: Path, rounds: int, prompts: int) -> str:
    results: dict[str, list[tuple[float, float]]] = {"kv": [], "round-robin": []}
    for r in range(rounds):
        for name, frontend in (("kv", setup.kv), ("round-robin", setup.rr)):
            for port in setup.ports:
                control(port, "clear_kv_blocks")
            before = prefix_counters(setup.ports)
            run = vllm_bench(frontend.base, model, tmp / f"prefix-{name}-{r}.json",
                             [*PREFIXED, "--num-prompts", str(prompts), "--seed", str(r)])
            after = prefix_counters(setup.ports)
            rate = (after[0] - before[0]) / max(1.0, after[1] - before[1])
            results[name].append((run["median_ttft_ms"], rate))
    rows = ["| router | TTFT p50 ms | prefix cache hit rate |", "|---|---|---|"]
    for name, values in results.items():
        rows.append(f"| {name} | {statistics.median(v[0] for v in values):.2f} | "
                    f"{statistics.median(v[1] for v in values):.1%} |")
    return "\n".join(rows)


def cross_check(setup: Setup, model: Path, tmp: Path, aiperf: str | None, prompts: int) -> str:
    rows = ["| client | output tok/s | TTFT p50 ms | requests |", "|---|---|---|---|"]
    figures = tmp / "ours.json"
    ours = subprocess.run(
        [sys.executable, "-m", "dynamo_vllm.cli.main", "bench", "--url", setup.rr.base,
         "--model", "tiny", "-n", str(prompts), "-c", "8", "--input-len", "64",
         "--output-len", "64", "--json", str(figures), "-q"], capture_output=True, text=True,
        timeout=900, env=ENV_ALL)
    if ours.returncode == 0:
        level = json.loads(figures.read_text())["levels"][0]
        rows.append(f"| dynamo-vllm bench | {level['output_tokens_per_s']:.1f} | "
                    f"{level['ttft_p50_s'] * 1000:.2f} | {level['completed']} |")
    else:
        rows.append(f"| dynamo-vllm bench | failed: {ours.stderr.strip()[-200:]} | | |")
    theirs = vllm_bench(setup.rr.base, model, tmp / "level-vllm.json",
                        [*RANDOM, "--num-prompts", str(prompts)])
    rows.append(f"| vLLM's benchmark client | {theirs['output_throughput']:.1f} | "
                f"{theirs['median_ttft_ms']:.2f} | {theirs['completed']} |")
    if aiperf:
        out = tmp / "aiperf"
        # AIPerf 0.x cannot load a local tokenizer directory in HF offline mode (it looks the
        # path up as a cached repo); online, an absolute path is loaded as it is, and the
        # Hub's address points at a closed loopback port so nothing leaves the machine.
        env = {k: v for k, v in ENV_ALL.items() if k != "HF_HUB_OFFLINE"}
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
        run = subprocess.run(
            [aiperf, "profile", "--model", "tiny", "--url", setup.rr.base,
             "--endpoint-type", "completions", "--streaming", "--concurrency", "8",
             "--request-count", str(prompts), "--synthetic-input-tokens-mean", "64",
             "--output-tokens-mean", "64", "--extra-inputs", "ignore_eos:true",
             "--tokenizer", str(model), "--artifact-dir", str(out)],
            capture_output=True, text=True, timeout=900, env=env)
        exports = list(out.rglob("profile_export_aiperf.json"))
        if run.returncode == 0 and exports:
            data = json.loads(exports[0].read_text())
            rows.append(f"| AIPerf | {data['output_token_throughput']['avg']:.1f} | "
                        f"{data['time_to_first_token']['p50']:.2f} | "
                        f"{data['request_count']['avg']:.0f} |")
        else:
            rows.append(f"| AIPerf | failed: {(run.stderr or run.stdout).strip()[-200:]} | | |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--aiperf", default=os.environ.get("AIPERF") or shutil.which("aiperf"),
                        help="the aiperf command, in a venv of its own (default: $AIPERF, "
                             "or aiperf on PATH)")
    opts = parser.parse_args()
    model = opts.model.resolve()
    with tempfile.TemporaryDirectory(prefix="dynamo-bench-") as name:
        tmp = Path(name)
        with Setup(model, tmp) as setup:
            print(f"Machine: {machine()}\n")
            print("### Through Dynamo's frontend against straight to the worker\n")
            print(overhead(setup, model, tmp, opts.rounds, opts.prompts) + "\n")
            print("### KV-aware routing against round-robin (shared prefixes)\n")
            print(routing(setup, model, tmp, opts.rounds, opts.prompts) + "\n")
            print("### One load level, three clients (through the frontend)\n")
            print(cross_check(setup, model, tmp, opts.aiperf, opts.prompts) + "\n")


if __name__ == "__main__":
    main()
