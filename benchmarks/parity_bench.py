"""Request-path parity with vLLM's own server, refereed by vLLM's own benchmark client.

    python -m benchmarks.parity_bench --model .tiny-model [--rounds 3] [--prompts 200]

The agent's worker (`python -m dynamo_vllm.agent`, the shipped `[health]` defaults) and
`python -m vllm.entrypoints.openai.api_server`, the same model and engine arguments, both
started, warmed up, then loaded in alternation by `vllm.benchmarks.serve` (random prompts of
64 tokens, 64 output tokens, 8 concurrent). Prints each round and the medians as a ratio
(worker / vLLM) against issue 19's goals.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.dynamo_bench import vllm_bench
from benchmarks.worker_bench import ENV, machine, start_vllm_server, wait_http_ok
from tests.harness import WorkerProcess, engine_config, free_port, write_config

# (key in vLLM's result file, label, goal for worker / vLLM, higher is better)
METRICS = [("output_throughput", "output tokens/s", 0.98, True),
           ("p50_ttft_ms", "TTFT p50 (ms)", 1.03, False),
           ("p99_ttft_ms", "TTFT p99 (ms)", 1.03, False),
           ("p50_itl_ms", "ITL p50 (ms)", None, False),
           ("p99_itl_ms", "ITL p99 (ms)", 1.05, False)]


def random_load(prompts: int) -> list[str]:
    return ["--dataset-name", "random", "--random-input-len", "64", "--random-output-len",
            "64", "--num-prompts", str(prompts), "--ignore-eos"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--logs", type=Path, help="copy both servers' logs here at the end")
    opts = parser.parse_args()
    os.environ.update(ENV)
    model = opts.model.resolve()
    print(f"Machine: {machine()}\n", flush=True)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        worker_port, vllm_port = free_port(), free_port()
        config = engine_config(model, worker_port)
        config["health"].pop("interval", None)  # the shipped default
        worker = WorkerProcess(write_config(tmp / "w.toml", config), worker_port,
                               tmp / "worker.log", env=ENV)
        server = start_vllm_server(model, vllm_port, tmp / "vllm.log")
        results: dict[str, list[dict[str, Any]]] = {"worker": [], "vllm": []}
        try:
            worker.wait_serving(300)
            wait_http_ok(f"http://127.0.0.1:{vllm_port}/health", 300)
            bases = {"worker": worker.base, "vllm": f"http://127.0.0.1:{vllm_port}"}
            for who, base in bases.items():
                vllm_bench(base, model, tmp / f"warm-{who}.json", random_load(32))
            for r in range(opts.rounds):
                order = ["worker", "vllm"] if r % 2 == 0 else ["vllm", "worker"]
                for who in order:
                    result = vllm_bench(bases[who], model, tmp / f"{who}-{r}.json",
                                        random_load(opts.prompts))
                    results[who].append(result)
                    print(f"round {r + 1} {who}: " + ", ".join(
                        f"{label} {result[key]:.2f}" for key, label, _, _ in METRICS)
                        + f", failed {result.get('failed', 0)}", flush=True)
        finally:
            worker.cleanup()
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
            if opts.logs:
                opts.logs.mkdir(parents=True, exist_ok=True)
                for log in ("worker.log", "vllm.log"):
                    shutil.copy(tmp / log, opts.logs / log)
    print(f"\n{opts.rounds} alternated rounds of {opts.prompts} requests (random 64-token "
          "prompts and outputs, 8 concurrent), vLLM's `vllm.benchmarks.serve`; medians, "
          "min-max in brackets.\n")
    print("| metric | worker | vLLM api_server | worker / vLLM | goal |")
    print("|---|---|---|---|---|")
    for key, label, goal, higher in METRICS:
        w = [r[key] for r in results["worker"]]
        v = [r[key] for r in results["vllm"]]
        ratio = statistics.median(w) / statistics.median(v) if statistics.median(v) else 0.0
        met = ""
        if goal is not None:
            ok = ratio >= goal if higher else ratio <= goal
            met = f"{'≥' if higher else '≤'} {goal} {'✓' if ok else '✗'}"
        print(f"| {label} | {statistics.median(w):.2f} ({min(w):.2f}-{max(w):.2f}) | "
              f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f}) | {ratio:.3f} | {met} |")


if __name__ == "__main__":
    main()
