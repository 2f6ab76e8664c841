"""A fleet of two nodes on one etcd, each with its own frontend: an etcd outage, a partition.

    python -m benchmarks.fleet_bench --model .tiny-model [--outage 30]

Two supervisors (one worker each, [dynamo] on etcd, [frontend] on) share a real etcd. A
client sends a completion every 0.25 s through node A's frontend, another through node B's.
The experiment:

1. steady state: requests succeed, node A's frontend lists both nodes' workers;
2. node B alone cut off from etcd for `--outage` seconds (its way to etcd is a relay that
   stops relaying without closing anything, as a network that drops packets), then healed;
   etcd stopped (SIGSTOP: a hung etcd, connections stay open) for `--outage` seconds, then
   resumed; then killed outright and restarted from its data directory;
3. for each phase: requests sent, failed, the longest run of failures, the workers node A's
   frontend lists, and the units' readiness.

Before that, each node's start: from the supervisor's start to its worker serving, and to
READY (the frontend serving the model with the worker behind it). The two nodes start at
once on the same cores, as after a power cut.

Prints Markdown tables (docs/fleet.md quotes them).
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.worker_bench import ENV, machine
from tests.harness import EtcdServer, SupervisorProcess, write_config
from tests.harness.dynamo import dynamo_node
from tests.harness.partition import CuttableRelay


class Prober:
    """A completion every `period` seconds through a frontend; records (time, ok)."""

    def __init__(self, base: str, period: float = 0.25):
        self.base, self.period = base, period
        self.results: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                ok = httpx.post(self.base + "/v1/completions", timeout=10, json={
                    "model": "tiny", "prompt": "fleet", "max_tokens": 2}).status_code == 200
            except httpx.HTTPError:
                ok = False
            self.results.append((started, ok))
            self._stop.wait(max(0.0, self.period - (time.monotonic() - started)))

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def between(self, start: float, end: float) -> tuple[int, int, float]:
        """Requests, failures and the longest run of failures (s) in [start, end)."""
        window = [(t, ok) for t, ok in self.results if start <= t < end]
        failures = sum(1 for _, ok in window if not ok)
        longest, run_start = 0.0, None
        for t, ok in window:
            if not ok and run_start is None:
                run_start = t
            if ok and run_start is not None:
                longest, run_start = max(longest, t - run_start), None
        if run_start is not None:
            longest = max(longest, end - run_start)
        return len(window), failures, longest


def listed(base: str) -> int | str:
    try:
        health = httpx.get(base + "/health", timeout=3).json()
    except (httpx.HTTPError, ValueError):
        return "no answer"
    return sum(1 for i in health.get("instances", []) if i.get("endpoint") == "generate")


def ready(node: SupervisorProcess) -> str:
    status = node.status()
    return "?" if status is None else ("ready" if status.get("ready") else "not ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--outage", type=float, default=30.0)
    opts = parser.parse_args()
    model = opts.model.resolve()
    os.environ.update(ENV)
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as name:
        tmp = Path(name)
        etcd = EtcdServer(tmp / "etcd", tmp / "etcd.log").start()
        nodes: list[SupervisorProcess] = []
        fronts: list[str] = []
        try:
            # Node B reaches etcd through a relay that can be cut: a partition of B alone.
            relay = CuttableRelay("127.0.0.1", etcd.client_port)
            for node, etcd_url in (("node-a", etcd.url), ("node-b", relay.url)):
                (tmp / node).mkdir()
                spec = dynamo_node(model, etcd_url=etcd_url, frontend_router="round-robin",
                                   workers={"count": 1}, health={"canary_idle": 60.0})
                nodes.append(SupervisorProcess(
                    write_config(tmp / node / f"{node}.toml", spec.config), tmp / node,
                    spec.metrics_port, env=ENV))
                fronts.append(spec.front)
            started = time.monotonic()
            serving: dict[int, float] = {}
            became_ready: dict[int, float] = {}
            while time.monotonic() < started + 300 and len(became_ready) < len(nodes):
                for i, node in enumerate(nodes):
                    status = node.status() or {}
                    workers = status.get("workers") or []
                    if i not in serving and workers and all(
                            w.get("state") == "serving" for w in workers):
                        serving[i] = time.monotonic() - started
                    if i not in became_ready and status.get("ready"):
                        became_ready[i] = time.monotonic() - started
                time.sleep(0.25)
            starts = [[chr(ord("A") + i), f"{serving.get(i, float('nan')):.1f}",
                       f"{became_ready.get(i, float('nan')):.1f}",
                       f"{became_ready.get(i, float('nan')) - serving.get(i, float('nan')):.1f}"]
                      for i in range(len(nodes))]
            rows: list[list[Any]] = []
            with Prober(fronts[0]) as probe, Prober(fronts[1]) as probe_b:
                def phase(name: str, seconds: float) -> None:
                    start = time.monotonic()
                    time.sleep(seconds)
                    sent, failed, longest = probe.between(start, time.monotonic())
                    sent_b, failed_b, _ = probe_b.between(start, time.monotonic())
                    rows.append([name, f"{seconds:.0f}", sent, failed, f"{longest:.1f}",
                                 f"{failed_b} of {sent_b}", listed(fronts[0]),
                                 " / ".join(ready(n) for n in nodes)])

                phase("steady", 10)
                relay.cut()
                phase("node B cut off from etcd", opts.outage)
                relay.heal()
                phase("node B's way to etcd back", 30)
                assert etcd.proc is not None
                etcd.proc.send_signal(signal.SIGSTOP)
                phase("etcd hung (SIGSTOP)", opts.outage)
                etcd.proc.send_signal(signal.SIGCONT)
                phase("etcd resumed", 20)
                etcd.proc.kill()
                etcd.proc.wait(10)
                phase("etcd killed", opts.outage)
                etcd.start()
                phase("etcd restarted (same data)", 30)
            print(f"Machine: {machine()}\n")
            print("### Start to READY with the frontend\n")
            print("| node | worker serving (s) | READY (s) | READY after the worker (s) |")
            print("|---|---|---|---|")
            for row in starts:
                print("| " + " | ".join(row) + " |")
            print("\n### An etcd outage, and node B partitioned from etcd\n")
            print("| phase | s | requests (A) | failed (A) | longest failure run (A, s) | failed "
                  "through B's frontend | workers node A's frontend lists | readiness (A / B) |")
            print("|---|---|---|---|---|---|---|---|")
            for row in rows:
                print("| " + " | ".join(str(c) for c in row) + " |")
        finally:
            for node in nodes:
                node.cleanup()
            relay.close()
            etcd.stop()


if __name__ == "__main__":
    main()
