"""Start to ready, cold: `dynamo-vllm run` against vLLM's own server, alternating in one run.

    python -m benchmarks.start_bench --model .tiny-model [--rounds 3]

The agent: `dynamo-vllm run` with one worker (the shipped `[health]` defaults), from the
spawn to the supervisor's READY=1 on a real notify socket. vLLM:
`python -m vllm.entrypoints.openai.api_server`, same model and engine arguments, from the
spawn to its first 200 on /health (polled every 50 ms). Each is stopped (SIGTERM, then
waited for) before the next starts; the order alternates between rounds. Prints each round
and the medians (issue 19's goal: the agent within +1 s).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.worker_bench import ENV, machine, start_vllm_server
from tests.harness import SupervisorProcess, engine_config, free_port, write_config


def agent_start(model: Path, tmp: Path) -> float:
    metrics_port = free_port()
    config = engine_config(model, free_port(), metrics={"port": metrics_port})
    config["health"].pop("interval", None)  # the shipped default
    started = time.monotonic()
    node = SupervisorProcess(write_config(tmp / "start.toml", config), tmp, metrics_port,
                             env=ENV)
    try:
        node.notify.wait_field("READY=1", 600)
        ready_at = next(at for at, message in node.notify.messages
                        if "READY=1" in message.split("\n"))
        return ready_at - started
    finally:
        node.proc.send_signal(signal.SIGTERM)
        node.proc.wait(120)
        node.cleanup()
        node.notify.close()


def vllm_start(model: Path, tmp: Path) -> float:
    port = free_port()
    started = time.monotonic()
    server = start_vllm_server(model, port, tmp / "vllm.log")
    try:
        deadline = started + 600
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"vLLM's server exited {server.returncode}: "
                                   f"{(tmp / 'vllm.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError("vLLM's server did not answer /health in 600 s")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    os.environ.update(ENV)
    model = opts.model.resolve()
    times: dict[str, list[float]] = {"agent": [], "vllm": []}
    print(f"Machine: {machine()}\n")
    print("| round | first | dynamo-vllm run to READY=1 (s) | vLLM's server to /health 200 (s) "
          "| difference (s) |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="start-bench-") as name:
        for round_ in range(opts.rounds):
            order = ["agent", "vllm"] if round_ % 2 == 0 else ["vllm", "agent"]
            for which in order:
                tmp = Path(name) / f"{which}-{round_}"
                tmp.mkdir()
                start = agent_start if which == "agent" else vllm_start
                times[which].append(start(model, tmp))
            agent, vllm = times["agent"][-1], times["vllm"][-1]
            print(f"| {round_ + 1} | {order[0]} | {agent:.2f} | {vllm:.2f} | "
                  f"{agent - vllm:+.2f} |", flush=True)
    agent, vllm = statistics.median(times["agent"]), statistics.median(times["vllm"])
    print(f"| median | | {agent:.2f} | {vllm:.2f} | {agent - vllm:+.2f} (goal ≤ +1 s) |")


if __name__ == "__main__":
    main()
