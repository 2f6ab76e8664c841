"""Failure detection with the default health settings: how soon the worker tells the truth.

    python -m benchmarks.detection_bench --model .tiny-model [--runs 5] [--vllm]

For each fault, a fresh worker (default `[health]`), the fault injected into its EngineCore,
and three times from the signal: `/health` no longer 200 (polled every 10 ms), the worker's
exit, and its exit code; then whether any process of its tree is left. Faults: SIGKILL;
SIGSTOP while idle; SIGSTOP with 4 streams in flight; and SIGKILL and SIGSTOP (in flight) of
the vLLM Worker process below EngineCore (the CPU engine runs its model there). With
`--vllm`, the same faults against `python -m vllm.entrypoints.openai.api_server` on the same
engine arguments, for the comparison (it has no hang detection: its rows stop at
`--vllm-wait` seconds).
Prints a Markdown table (medians of N, min and max) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from benchmarks.worker_bench import ENV, machine, start_vllm_server, wait_http_ok
from tests.harness import WorkerProcess, engine_config, free_port, write_config

STREAMS = 4


@dataclass
class Run:
    health_not_ok: float | None
    exited: float | None
    code: int | None
    leftovers: int


class HealthWatch(threading.Thread):
    """The first moment `/health` stops answering 200, from a 10 ms poll."""

    def __init__(self, url: str, started: float):
        super().__init__(daemon=True)
        self.url, self.started = url, started
        self.seen: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=0.5) as client:
            while not self.stop.is_set():
                try:
                    ok = client.get(self.url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if not ok:
                    self.seen = time.monotonic() - self.started
                    return
                time.sleep(0.01)


def streams(base: str, count: int, started: threading.Event,
            stop: threading.Event) -> list[threading.Thread]:
    """`count` clients, each streaming one completion after another until `stop`: requests
    are in flight whenever the fault comes (one completion alone lasts only seconds)."""
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 480, "ignore_eos": True,
            "stream": True}

    def one() -> None:
        while not stop.is_set():
            try:
                with httpx.stream("POST", base + "/v1/completions", json=body,
                                  timeout=120) as r:
                    for _ in r.iter_lines():
                        started.set()
            except httpx.HTTPError:
                time.sleep(0.1)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    return threads


def engine_process(pid: int, name: str) -> psutil.Process:
    """EngineCore, or the vLLM Worker process below it (the CPU engine runs its model there)."""
    for child in psutil.Process(pid).children(recursive=True):
        if name in child.name() or name in " ".join(child.cmdline()):
            return child
    raise RuntimeError(f"no {name} process under {pid}")


def left_after(pids: list[int], grace: float) -> int:
    deadline = time.monotonic() + grace
    while True:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return len(alive)
        time.sleep(0.1)


def inject(base: str, pid: int, target: str, sig: signal.Signals, loaded: bool,
           wait_exit: Callable[[float], int | None], limit: float) -> Run:
    tree = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    core = engine_process(pid, target)
    stop_streams = threading.Event()
    if loaded:
        started_streams = threading.Event()
        streams(base, STREAMS, started_streams, stop_streams)
        started_streams.wait(60)
        time.sleep(0.3)
    started = time.monotonic()
    watch = HealthWatch(base + "/health", started)
    core.send_signal(sig)
    watch.start()
    code = wait_exit(limit)
    exited = time.monotonic() - started if code is not None else None
    watch.stop.set()
    stop_streams.set()
    watch.join(2)
    # multiprocessing's resource tracker exits by itself once its pipe closes: give it time.
    return Run(watch.seen, exited, code, left_after(tree, 5.0))


def worker_run(model: Path, tmp: Path, name: str, target: str, sig: signal.Signals,
               loaded: bool) -> Run:
    port = free_port()
    # The harness's config with the shipped [health] defaults put back.
    config = engine_config(model, port)
    config["health"].pop("interval", None)
    worker = WorkerProcess(write_config(tmp / f"{name}.toml", config), port,
                           tmp / f"{name}.log", env=ENV)
    try:
        worker.wait_serving(300)

        def wait_exit(limit: float) -> int | None:
            try:
                return worker.wait_exit(limit)
            except Exception:
                return None
        return inject(worker.base, worker.proc.pid, target, sig, loaded, wait_exit, 120)
    finally:
        worker.cleanup()


def vllm_run(model: Path, tmp: Path, name: str, target: str, sig: signal.Signals,
             loaded: bool, wait: float) -> Run:
    port = free_port()
    server = start_vllm_server(model, port, tmp / f"{name}.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(base + "/health", 300)

        def wait_exit(limit: float) -> int | None:
            try:
                return server.wait(min(limit, wait))
            except subprocess.TimeoutExpired:
                return None
        return inject(base, server.pid, target, sig, loaded, wait_exit, wait)
    finally:
        for proc in [psutil.Process(server.pid)] if psutil.pid_exists(server.pid) else []:
            for child in [*proc.children(recursive=True), proc]:
                child.kill()
        server.wait(30)


FAULTS = [("EngineCore", signal.SIGKILL, False),
          ("EngineCore", signal.SIGSTOP, False),
          ("EngineCore", signal.SIGSTOP, True),
          ("VLLM::Worker", signal.SIGKILL, False),
          ("VLLM::Worker", signal.SIGSTOP, True)]


def cell(values: list[float | None]) -> str:
    seen = sorted(v for v in values if v is not None)
    if not seen:
        return "never"
    mid = seen[len(seen) // 2]
    never = f", {len(values) - len(seen)} never" if len(seen) < len(values) else ""
    return f"{mid:.2f} ({seen[0]:.2f}-{seen[-1]:.2f}{never})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--vllm", action="store_true")
    parser.add_argument("--vllm-wait", type=float, default=30.0)
    parser.add_argument("--only", help="run the faults whose label contains this")
    parser.add_argument("--no-worker", action="store_true", help="vLLM's server only")
    opts = parser.parse_args()
    os.environ.update(ENV)
    model = opts.model.resolve()
    print(f"Machine: {machine()}\n")
    print("| server | fault | runs | /health not 200 (s) | exit (s) | exit codes | "
          "processes left |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        servers = ([] if opts.no_worker else ["worker"]) + \
            (["vLLM api_server"] if opts.vllm else [])
        for server in servers:
            for target, sig, loaded in FAULTS:
                if opts.only and opts.only not in f"{target} {sig.name}":
                    continue
                label = f"{target} {sig.name}, " + (f"{STREAMS} streams in flight" if loaded
                                                    else "idle")
                runs = []
                for i in range(opts.runs):
                    name = f"{server[:4]}-{target[-4:]}-{sig.name}-{loaded}-{i}"
                    runs.append(worker_run(model, Path(tmp), name, target, sig, loaded)
                                if server == "worker" else
                                vllm_run(model, Path(tmp), name, target, sig, loaded,
                                         opts.vllm_wait))
                codes = sorted({r.code for r in runs if r.code is not None})
                print(f"| {server} | {label} | {len(runs)} | "
                      f"{cell([r.health_not_ok for r in runs])} | "
                      f"{cell([r.exited for r in runs])} | {codes} | "
                      f"{sum(r.leftovers for r in runs)} |", flush=True)


if __name__ == "__main__":
    main()
