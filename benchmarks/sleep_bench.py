"""Sleep/wake benchmark: latency idle, drain time under load, what happens to requests.

    python -m benchmarks.sleep_bench --model .tiny-model [--cycles 5] [--streams 4]

For each `sleep.inflight` mode (drain, abort) one worker is started. Then:
1. idle: `POST /engine/sleep {"level": 0}` and `POST /engine/wake_up`, timed at the client;
2. under load: `--streams` streaming completions of 500 tokens are started, and once
   the first token arrives the worker is put to sleep. The sleep call's duration is the
   drain time; every request is classified (finished in full, aborted with
   finish_reason "abort", refused with 503). "lost" counts requests that ended any other
   way (a truncated stream without a reason): it must be 0.
Level 0 is what the CPU engine can do (levels 1 and 2 release nothing there); levels 1
and 2 need a GPU build of vLLM. Then wake on request: a worker with `sleep.idle_after`
goes to sleep by itself, and a one-token completion wakes it: its latency against the same
request on the awake worker. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.worker_bench import ENV, machine
from tests.harness import (
    WorkerProcess,
    engine_config,
    free_port,
    stream_completion,
    wait_for,
    write_config,
)

STREAM_TOKENS = 500  # what tests.harness.stream_completion asks for


def timed_post(base: str, path: str, body: object) -> tuple[float, dict]:
    started = time.perf_counter()
    resp = httpx.post(base + path, json=body, timeout=120)
    elapsed = time.perf_counter() - started
    answer = resp.json()
    if resp.status_code != 200 or answer.get("status") != "ok":
        raise RuntimeError(f"{path}: {resp.status_code} {answer}")
    return elapsed, answer


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values) * 1000:.1f} (max {max(values) * 1000:.1f})"


def run_mode(model: Path, tmp: Path, mode: str, cycles: int, streams: int) -> list[str]:
    port = free_port()
    config = engine_config(model, port, discovery={"path": str(tmp / f"endpoints-{mode}")},
                           sleep={"inflight": mode, "drain_timeout": 60.0})
    worker = WorkerProcess(write_config(tmp / f"{mode}.toml", config), port,
                           tmp / f"worker-{mode}.log", env=ENV)
    try:
        worker.wait_serving(300)
        idle_sleep, idle_wake = [], []
        for _ in range(cycles):
            elapsed, _ = timed_post(worker.base, "/engine/sleep", {"level": 0})
            idle_sleep.append(elapsed)
            elapsed, _ = timed_post(worker.base, "/engine/wake_up", {})
            idle_wake.append(elapsed)

        load_sleep, load_wake = [], []
        outcomes = {"finished": 0, "aborted": 0, "refused": 0, "lost": 0}
        for _ in range(cycles):
            results: list[dict] = []
            started = [threading.Event() for _ in range(streams)]
            threads = [threading.Thread(target=stream_completion, args=(worker, results, s))
                       for s in started]
            for thread in threads:
                thread.start()
            wait_for(lambda events=started: any(e.is_set() for e in events), 60,
                     interval=0.005, what="a first token")
            elapsed, _ = timed_post(worker.base, "/engine/sleep", {"level": 0})
            load_sleep.append(elapsed)
            for thread in threads:
                thread.join(120)
            elapsed, _ = timed_post(worker.base, "/engine/wake_up", {})
            load_wake.append(elapsed)
            for result in results:
                if result["status"] == 503:
                    outcomes["refused"] += 1
                elif result["finish"] == "length":
                    outcomes["finished"] += 1
                elif result["finish"] == "abort":
                    outcomes["aborted"] += 1
                else:
                    outcomes["lost"] += 1
        return [f"| {mode} | idle | {ms(idle_sleep)} | {ms(idle_wake)} | - |",
                f"| {mode} | {streams} streams × {STREAM_TOKENS} tokens | {ms(load_sleep)} | "
                f"{ms(load_wake)} | {outcomes['finished']} finished, {outcomes['aborted']} "
                f"aborted, {outcomes['refused']} refused (503), {outcomes['lost']} lost |"]
    finally:
        worker.cleanup()


def wake_on_request(model: Path, tmp: Path, cycles: int) -> str:
    """Idle sleep (sleep.idle_after = 2 s, level 1): the latency of the request that wakes
    the worker against the same request right after, on the awake worker."""
    port = free_port()
    config = engine_config(model, port, discovery={"path": str(tmp / "endpoints-idle")},
                           sleep={"idle_after": 2.0, "idle_level": 1})
    worker = WorkerProcess(write_config(tmp / "idle.toml", config), port,
                           tmp / "worker-idle.log", env=ENV)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 1}

    def timed_completion() -> float:
        started = time.perf_counter()
        resp = httpx.post(worker.base + "/v1/completions", json=body, timeout=60)
        if resp.status_code != 200:
            raise RuntimeError(f"completion: {resp.status_code} {resp.text}")
        return time.perf_counter() - started

    try:
        worker.wait_serving(300)
        waking, awake = [], []
        for _ in range(cycles):
            wait_for(lambda: (worker.health() or (0, {}))[1].get("state") == "sleeping", 60,
                     interval=0.05, what="asleep by itself")
            waking.append(timed_completion())
            awake.append(timed_completion())
    finally:
        worker.cleanup()
    added = [w - a for w, a in zip(waking, awake, strict=True)]
    return ("| first request after an idle sleep | same request, awake | added by the wake |\n"
            "|---|---|---|\n"
            f"| {ms(waking)} | {ms(awake)} | {ms(added)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--modes", default="drain,abort")
    parser.add_argument("--idle-cycles", type=int, default=5,
                        help="wake-on-request cycles after an idle sleep (0: skip)")
    opts = parser.parse_args()
    print(f"Machine: {machine()}\n")
    print(f"Sleep/wake at level 0, {opts.cycles} cycles each; client-side ms, median (max)\n")
    print("| sleep.inflight | load | sleep | wake | requests in flight at sleep |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in opts.modes.split(","):
            for row in run_mode(opts.model.resolve(), Path(tmp), mode, opts.cycles,
                                opts.streams):
                print(row, flush=True)
        if opts.idle_cycles:
            print(f"\nWake on request after an idle sleep, {opts.idle_cycles} cycles; a "
                  "one-token completion, client-side ms, median (max)\n")
            print(wake_on_request(opts.model.resolve(), Path(tmp), opts.idle_cycles))


if __name__ == "__main__":
    main()
