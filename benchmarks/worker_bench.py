"""Worker benchmarks: request-path overhead against vLLM's own server, and failure detection.

    python -m benchmarks.worker_bench --model .tiny-model [--rounds 3] [--kill-runs 5]

1. Overhead: the agent's worker and `python -m vllm.entrypoints.openai.api_server`, the same
   model and engine arguments, both started, then loaded in alternation (8 concurrent
   streams, 200 requests a round). Prints throughput and TTFT/ITL as ratios (worker / vLLM).
2. Failure detection: time from SIGKILL and from SIGSTOP of the worker's EngineCore to the
   worker's exit, median of N runs, with the exit codes.
Prints Markdown tables; paste them into benchmarks/RESULTS.md with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.loadgen import LoadResult, median, run_load
from tests.harness import (
    WorkerProcess,
    engine_config,
    free_port,
    wait_for,
    write_config,
)

ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
       "VLLM_HOST_IP": "127.0.0.1"}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh
                     if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, " \
           f"{platform.platform()}, Python {platform.python_version()}"


def start_vllm_server(model: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    cfg = engine_config(model, port)["engine"]
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", str(cfg["max_model_len"]), "--kv-cache-memory-bytes",
            str(cfg["kv_cache_memory_bytes"]), "--dtype", cfg["dtype"], "--max-num-seqs",
            str(cfg["max_num_seqs"]), "--enforce-eager"]
    return subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, **ENV})


def wait_http_ok(url: str, timeout: float) -> None:
    import httpx

    def ok() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    wait_for(ok, timeout, interval=0.5, what=url)


def overhead(model: Path, tmp: Path, rounds: int, requests: int, concurrency: int) -> str:
    worker_port, vllm_port = free_port(), free_port()
    worker = WorkerProcess(write_config(tmp / "w.toml", engine_config(
        model, worker_port, health={"canary_idle": 30.0})), worker_port, tmp / "worker.log",
        env=ENV)
    server = start_vllm_server(model, vllm_port, tmp / "vllm.log")
    try:
        worker.wait_serving(300)
        wait_http_ok(f"http://127.0.0.1:{vllm_port}/health", 300)
        targets = {"worker": worker.base, "vllm": f"http://127.0.0.1:{vllm_port}"}
        for url in targets.values():  # warm-up
            asyncio.run(run_load(url, "tiny", 16, concurrency))
        runs: dict[str, list[LoadResult]] = {"worker": [], "vllm": []}
        for r in range(rounds):
            order = ["worker", "vllm"] if r % 2 == 0 else ["vllm", "worker"]
            for name in order:
                runs[name].append(asyncio.run(run_load(targets[name], "tiny", requests,
                                                       concurrency)))
    finally:
        worker.cleanup()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)

    def agg(name: str, fn) -> float:  # type: ignore[no-untyped-def]
        return median([fn(r) for r in runs[name]])

    rows = [("output tokens/s", lambda r: r.output_tokens_per_s),
            ("TTFT p50 (ms)", lambda r: r.ttft(0.5) * 1000),
            ("TTFT p99 (ms)", lambda r: r.ttft(0.99) * 1000),
            ("ITL p50 (ms)", lambda r: r.itl(0.5) * 1000),
            ("ITL p99 (ms)", lambda r: r.itl(0.99) * 1000),
            ("errors", lambda r: float(r.errors))]
    lines = [f"Request-path overhead: {rounds} alternated rounds of {requests} streaming "
             f"requests (64 tokens), {concurrency} concurrent; medians over rounds.", "",
             "| metric | worker | vLLM api_server | worker / vLLM |", "|---|---|---|---|"]
    for label, fn in rows:
        a, b = agg("worker", fn), agg("vllm", fn)
        ratio = f"{a / b:.3f}" if b else "-"
        lines.append(f"| {label} | {a:.2f} | {b:.2f} | {ratio} |")
    return "\n".join(lines)


def detection(model: Path, tmp: Path, runs: int) -> str:
    lines = ["Failure detection: time from the signal to the worker's exit (health.interval "
             "1 s; canary_idle 2 s, canary_timeout 1 s, canary_failures 2).", "",
             "| fault | runs | median (s) | min (s) | max (s) | exit codes |",
             "|---|---|---|---|---|---|"]
    for sig in (signal.SIGKILL, signal.SIGSTOP):
        times, codes = [], []
        for i in range(runs):
            port = free_port()
            conf = engine_config(model, port, health={
                "interval": 1.0, "canary_idle": 2.0, "canary_timeout": 1.0,
                "canary_failures": 2})
            worker = WorkerProcess(write_config(tmp / f"d{sig}{i}.toml", conf), port,
                                   tmp / f"d{sig}{i}.log", env=ENV)
            try:
                worker.wait_serving(300)
                core = worker.engine_core()
                started = time.monotonic()
                core.send_signal(sig)
                codes.append(worker.wait_exit(120))
                times.append(time.monotonic() - started)
            finally:
                worker.cleanup()
        lines.append(f"| EngineCore {sig.name} | {runs} | {median(times):.2f} | "
                     f"{min(times):.2f} | {max(times):.2f} | {sorted(set(codes))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--kill-runs", type=int, default=5)
    parser.add_argument("--skip", choices=["overhead", "detection"], action="append",
                        default=[])
    opts = parser.parse_args()
    os.environ.update(ENV)
    print(f"Machine: {machine()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        if "overhead" not in opts.skip:
            print(overhead(opts.model.resolve(), Path(tmp), opts.rounds, opts.requests,
                           opts.concurrency), "\n", flush=True)
        if "detection" not in opts.skip:
            print(detection(opts.model.resolve(), Path(tmp), opts.kill_runs), flush=True)


if __name__ == "__main__":
    main()
