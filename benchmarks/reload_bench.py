"""A rolling reload under load through the node's frontend: what the clients see.

    python -m benchmarks.reload_bench --model .tiny-model [--concurrency 1,2] [--rolls 2]

One supervisor with [dynamo] and [frontend] on and two workers. For each concurrency,
that many clients stream 32-token completions through the frontend one after another; after
`--steady` seconds the engine's `max_num_seqs` changes in the config and the supervisor gets
SIGHUP, which restarts the workers one at a time (each leaves Dynamo's discovery and drains
before it stops). The table gives, per roll: how long the roll took (SIGHUP to READY=1
again), the requests started during it and how many failed, and TTFT p50/p99 during the roll
against the steady state just before it.

Prints a Markdown table (BENCHMARKS.md quotes it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from benchmarks.loadgen import quantile
from benchmarks.worker_bench import ENV, machine
from tests.harness import SteadyStreams, SupervisorProcess, wait_for, write_config
from tests.harness.dynamo import dynamo_node


def ttft(results: list[dict], start: float, end: float) -> str:
    values = [r["ttft"] for r in results if start <= r["started"] < end and r["ttft"]]
    if not values:
        return "-"
    return f"{quantile(values, 0.5) * 1000:.0f} / {quantile(values, 0.99) * 1000:.0f}"


def roll(node: SupervisorProcess, config_path: Path, seqs: int) -> float:
    """Reload with a changed engine setting; seconds from SIGHUP to READY=1 after it."""
    pids = {w["worker"]: w["pid"] for w in node.status()["workers"]}  # type: ignore[index]
    text = config_path.read_text()
    old = next(line for line in text.splitlines() if line.startswith("max_num_seqs"))
    config_path.write_text(text.replace(old, f"max_num_seqs = {seqs}"))
    mark = len(node.notify.fields())
    started = time.monotonic()
    node.proc.send_signal(signal.SIGHUP)
    node.notify.wait_field("RELOADING=1", 30, after=mark)
    wait_for(lambda: all(w["pid"] != pids[w["worker"]] and w["state"] == "serving"
                         for w in (node.status() or {"workers": []})["workers"]), 600,
             interval=0.25, what="both workers rolled")
    node.notify.wait_field("READY=1", 600, after=mark)
    return time.monotonic() - started


def failures(node: SupervisorProcess) -> int:
    """Restarts the supervisor counted as failures (a requested roll is not one)."""
    return sum(w["restarts"] for w in node.status()["workers"])  # type: ignore[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--concurrency", default="1,2")
    parser.add_argument("--rolls", type=int, default=2, help="rolls per concurrency")
    parser.add_argument("--steady", type=float, default=20.0)
    opts = parser.parse_args()
    os.environ.update(ENV)
    rows = []
    with tempfile.TemporaryDirectory(prefix="reload-bench-") as name:
        tmp = Path(name)
        spec = dynamo_node(opts.model.resolve(), file_kv=tmp / "dynamo-kv",
                           frontend_router="round-robin",
                           workers={"count": 2, "stop_timeout": 30.0, "drain_timeout": 10.0},
                           health={"canary_idle": 60.0})
        config_path = write_config(tmp / "tiny.toml", spec.config)
        node = SupervisorProcess(config_path, tmp, spec.metrics_port, env=ENV)
        try:
            node.notify.wait_field("READY=1", 600)
            seqs = 8
            for concurrency in [int(c) for c in opts.concurrency.split(",")]:
                for _ in range(opts.rolls):
                    load = SteadyStreams(str(spec.front), concurrency=concurrency).start()
                    try:
                        time.sleep(opts.steady)
                        began = time.monotonic()
                        failed_before = failures(node)
                        seqs = 6 if seqs == 8 else 8
                        took = roll(node, config_path, seqs)
                        ended = time.monotonic()
                        time.sleep(5)
                    finally:
                        load.stop()
                    during = [r for r in load.results if began <= r["started"] < ended]
                    failed = [r for r in during if r in load.failed()]
                    rows.append(f"| {concurrency} | {took:.1f} | {len(during)} | "
                                f"{len(failed)} of {len(load.failed())} | "
                                f"{ttft(load.results, began - opts.steady, began)} | "
                                f"{ttft(load.results, began, ended)} | "
                                f"{failures(node) - failed_before} |")
                    print(rows[-1], flush=True)
        finally:
            node.cleanup()
            logs = Path("build/bench-logs")
            logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(node.log_path, logs / "reload-supervisor.log")
    print(f"\nMachine: {machine()}\n")
    print("Rolling reload of 2 workers through the frontend (SIGHUP, max_num_seqs changed):\n")
    print("| clients | roll, SIGHUP to READY (s) | requests during the roll | failed (during / "
          "whole run) | TTFT p50 / p99 steady (ms) | TTFT p50 / p99 during the roll (ms) | "
          "worker failures during the roll |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
