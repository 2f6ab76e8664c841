"""Lint the Grafana dashboard: generated from grafana/build_dashboard.py, unique panel ids, the
provisioned datasource, defined variables, and metric names the agent or the rules export."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from dynamo_vllm.contract.protocol import Metric

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards" / "dynamo-vllm.json").read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def queries() -> list[str]:
    exprs = [t["expr"] for p in panels() for t in p["targets"]]
    return exprs + [v["definition"] for v in DASHBOARD["templating"]["list"]]


def known_metrics() -> set[str]:
    rules = yaml.safe_load((ROOT / "prometheus" / "rules" / "recording.yml").read_text())
    names = {r["record"] for g in rules["groups"] for r in g["rules"]}
    source = (ROOT / "supervisor" / "metrics.py").read_text()
    for match in re.finditer(r'(Gauge|Counter)(?:MetricFamily)?\(\s*f"\{PREFIX\}_(\w+)"', source):
        kind, name = match.groups()
        names.add(f"dynamo_agent_{name}" + ("_total" if kind == "Counter" else ""))
    for value in vars(Metric).values():
        if isinstance(value, str) and value.startswith("dynamo_component_"):
            names.update({value, value + "_total"})
    names.add("vllm:generation_tokens_total")  # a variable's source: vLLM's own counter
    return names


def test_the_json_is_what_the_generator_writes() -> None:
    result = subprocess.run([sys.executable, str(GRAFANA / "build_dashboard.py"), "--check"],
                            timeout=60)
    assert result.returncode == 0, "run: python grafana/build_dashboard.py"


def test_panel_ids_are_unique_and_rows_are_there() -> None:
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    rows = [p["title"] for p in DASHBOARD["panels"] if p["type"] == "row"]
    assert rows == ["Overview", "Latency", "Throughput",
                    "Front door (Dynamo's frontend) and routing", "KV cache and queue",
                    "Node and GPU", "Checkpoint/restore"]


def test_datasources_match_the_provisioning() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources.yml").read_text())
    uids = {d["uid"] for d in provisioned["datasources"]}
    used = {p["datasource"]["uid"] for p in panels()}
    used |= {t["datasource"]["uid"] for p in panels() for t in p["targets"]}
    used |= {v["datasource"]["uid"] for v in DASHBOARD["templating"]["list"]}
    assert used <= uids, used - uids


def test_every_variable_used_is_defined() -> None:
    defined = {v["name"] for v in DASHBOARD["templating"]["list"]}
    used = {m for q in queries() for m in re.findall(r"\$(\w+)", q)} - {"__all"}
    assert used <= defined, used - defined
    assert defined == {"instance", "model", "worker"}


def test_metric_names_are_exported() -> None:
    names = set()
    for query in queries():
        names |= set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", query))
        names |= set(re.findall(r"label_values\(([a-zA-Z_:][a-zA-Z0-9_:]*)[,{]", query))
    unknown = names - known_metrics()
    assert not unknown, f"not exported by the agent or the recording rules: {sorted(unknown)}"
