"""No false hang verdict under stress: the default `[health]` against long prompts at full load.

    python -m benchmarks.stress_bench --model .tiny-model [--duration 600] [--hog-duration 120]

One worker (`python -m dynamo_vllm.agent`, the shipped `[health]` defaults: the stall check
and the canary) on the tiny model, loaded by vLLM's own client (`vllm.benchmarks.serve`) in
back-to-back rounds: random prompts that fill `max_model_len` with their output (long
prefills), twice as many concurrent requests as `max_num_seqs`, so the engine is never idle
and its queue never empty. First `--duration` seconds of that alone, then `--hog-duration`
seconds with as many busy-loop processes as the machine has CPUs taking the cores too. A
hang verdict ends the worker (exit 4): the worker must be the same process at the end, and
its log must hold no "engine hung" line. Prints one row per phase (rounds, requests completed
and failed, the worst round's TTFT and ITL p99 as vLLM's client saw them), then the verdicts
and the canary's slow answers and failures from the worker's log (a slow canary while the
engine steps is logged and not counted, by design).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.dynamo_bench import vllm_bench
from benchmarks.worker_bench import ENV, machine
from tests.harness import WorkerProcess, engine_config, free_port, write_config

MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 8
OUTPUT_LEN = 64
# Random prompts of this many tokens, plus OUTPUT_LEN, fill the context (the tokenizer's
# round trip of random ids and the server's BOS can add a few, so a little room is left).
INPUT_LEN = MAX_MODEL_LEN - OUTPUT_LEN - 16
PROMPTS_PER_ROUND = 48
HUNG = "engine hung"
CANARY_SLOW = "canary slow"
CANARY_FAILED = "canary failed"


@dataclass
class Phase:
    index: int
    name: str
    rounds: int = 0
    completed: int = 0
    failed: int = 0
    seconds: float = 0.0
    ttft_p99_ms: list[float] = field(default_factory=list)
    itl_p99_ms: list[float] = field(default_factory=list)


def stress_load() -> list[str]:
    return ["--dataset-name", "random", "--random-input-len", str(INPUT_LEN),
            "--random-output-len", str(OUTPUT_LEN), "--num-prompts", str(PROMPTS_PER_ROUND),
            "--ignore-eos", "--max-concurrency", str(2 * MAX_NUM_SEQS)]


def hog() -> None:
    while True:
        pass


def run_phase(phase: Phase, worker: WorkerProcess, model: Path, tmp: Path,
              seconds: float) -> None:
    ends = time.monotonic() + seconds
    started = time.monotonic()
    while time.monotonic() < ends and worker.proc.poll() is None:
        out = tmp / f"phase{phase.index}-round{phase.rounds}.json"
        try:
            result = vllm_bench(worker.base, model, out, stress_load())
        except subprocess.CalledProcessError as exc:
            print(f"{phase.name} round {phase.rounds + 1}: vLLM's client failed "
                  f"(exit {exc.returncode}): {exc.stderr[-500:]!r}", flush=True)
            phase.failed += PROMPTS_PER_ROUND
            phase.rounds += 1
            continue
        phase.rounds += 1
        phase.completed += int(result.get("completed", 0))
        phase.failed += int(result.get("failed", 0))
        phase.ttft_p99_ms.append(float(result.get("p99_ttft_ms", 0.0)))
        phase.itl_p99_ms.append(float(result.get("p99_itl_ms", 0.0)))
    phase.seconds = time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--hog-duration", type=float, default=120.0)
    opts = parser.parse_args()
    os.environ.update(ENV)
    model = opts.model.resolve()
    print(f"Machine: {machine()}\n", flush=True)
    phases = [Phase(0, "max_model_len, full queue"),
              Phase(1, f"the same, {os.cpu_count()} busy-loop processes beside it")]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        port = free_port()
        config = engine_config(model, port)
        config["health"].pop("interval", None)  # the shipped [health] defaults
        config["engine"].update(max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS)
        log_path = tmp / "worker.log"
        worker = WorkerProcess(write_config(tmp / "stress.toml", config), port, log_path,
                               env=ENV)
        hogs: list[multiprocessing.Process] = []
        try:
            worker.wait_serving(300)
            pid = worker.proc.pid
            run_phase(phases[0], worker, model, tmp, opts.duration)
            hogs = [multiprocessing.Process(target=hog, daemon=True)
                    for _ in range(os.cpu_count() or 1)]
            for process in hogs:
                process.start()
            run_phase(phases[1], worker, model, tmp, opts.hog_duration)
            code = worker.proc.poll()
        finally:
            for process in hogs:
                process.kill()
            worker.cleanup()
        log = log_path.read_text(errors="replace").splitlines()
    verdicts = [line for line in log if HUNG in line]
    slow = [line for line in log if CANARY_SLOW in line]
    failed = [line for line in log if CANARY_FAILED in line]
    print("| phase | seconds | rounds | requests completed | failed | worst round's TTFT p99 "
          "(ms) | worst round's ITL p99 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for phase in phases:
        print(f"| {phase.name} | {phase.seconds:.0f} | {phase.rounds} | {phase.completed} | "
              f"{phase.failed} | {max(phase.ttft_p99_ms, default=0.0):.0f} | "
              f"{max(phase.itl_p99_ms, default=0.0):.0f} |")
    print(f"\nworker pid {pid}: {'still serving' if code is None else f'exited {code}'}; "
          f"hang verdicts {len(verdicts)}; canary slow {len(slow)}, failed {len(failed)}")
    for line in (verdicts + failed + slow)[:10]:
        print(f"  {line[:200]}")
    sys.exit(0 if code is None and not verdicts else 1)


if __name__ == "__main__":
    main()
