"""Writes grafana/dashboards/dynamo-vllm.json: the dashboard as code, in one place.

    python grafana/build_dashboard.py          # rewrite the JSON
    python grafana/build_dashboard.py --check  # exit 1 if the JSON is not what this writes

Plain dictionaries rather than grafana-foundation-sdk: the dashboard is seven rows of
timeseries and stat panels, and a test lints the output (unique ids, the provisioned
datasource uid, defined variables, known metric names) and runs every query against a live
Prometheus, which checks more than a typed builder would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("dashboards") / "dynamo-vllm.json"
DATASOURCE = {"type": "prometheus", "uid": "dynamo-vllm-prometheus"}
INST = 'instance=~"$instance"'
SEL = f'{INST}, worker=~"$worker"'


class Layout:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += 8
            self.x = 0
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def panel(self, kind: str, title: str, targets: list[tuple[str, str]], unit: str = "short",
              width: int = 8, **extra: Any) -> None:
        if self.x + width > 24:
            self.y += 8
            self.x = 0
        self.panels.append({
            "type": kind, "title": title, "id": self._id(), "datasource": DATASOURCE,
            "gridPos": {"h": 8, "w": width, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                         "legendFormat": legend} for i, (expr, legend) in enumerate(targets)],
            **extra,
        })
        self.x += width


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2,
            "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"text": "All", "value": "$__all"}, "sort": 1}


def build() -> dict[str, Any]:
    d = Layout()
    d.row("Overview")
    d.panel("stat", "Workers serving", [(f"sum by (instance) (dynamo_agent_workers_serving{{{INST}}})", "{{instance}}")], width=4)
    d.panel("stat", "Instances ready", [(f"sum(dynamo_agent_ready{{{INST}}})", "ready")], width=4)
    d.panel("timeseries", "Worker restarts (by reason, 15 min)", [(f"sum by (instance, worker, reason) (increase(dynamo_agent_worker_restarts_total{{{SEL}}}[15m]))", "{{instance}} w{{worker}} {{reason}}")], width=8)
    d.panel("timeseries", "Watchdog pings / withheld", [(f"sum by (instance) (rate(dynamo_agent_watchdog_pings_total{{{INST}}}[1m]))", "{{instance}} pings/s"), (f"sum by (instance) (rate(dynamo_agent_watchdog_withheld_total{{{INST}}}[1m]))", "{{instance}} withheld/s")], unit="ops", width=8)
    d.panel("state-timeline", "Worker state", [(f"max by (instance, worker, state) (dynamo_agent_worker_state{{{SEL}}}) == 1", "{{instance}} w{{worker}} {{state}}")], width=24)

    d.row("Latency")
    for metric, title in (("time_to_first_token_seconds", "Time to first token"),
                          ("inter_token_latency_seconds", "Inter-token latency"),
                          ("e2e_request_latency_seconds", "End-to-end latency")):
        d.panel("timeseries", title, [(f'dynamo_vllm:{metric}:{q}{{{INST}, model_name=~"$model"}}', f"{{{{instance}}}} {{{{model_name}}}} {q}") for q in ("p50", "p95", "p99")], unit="s")

    d.row("Throughput")
    d.panel("timeseries", "Generated tokens/s", [(f'sum by (instance, model_name) (dynamo_vllm:generation_tokens:rate1m{{{SEL}, model_name=~"$model"}})', "{{instance}} {{model_name}}")], unit="short", width=12)
    d.panel("timeseries", "Requests/s and prompt tokens/s", [(f'sum by (instance, model_name) (dynamo_vllm:requests:rate1m{{{SEL}, model_name=~"$model"}})', "{{instance}} {{model_name}} req/s"), (f'sum by (instance, model_name) (dynamo_vllm:prompt_tokens:rate1m{{{SEL}, model_name=~"$model"}})', "{{instance}} {{model_name}} prompt tok/s")], unit="short", width=12)

    d.row("Front door (Dynamo's frontend) and routing")
    FRONT = f'{INST}, model=~"$model"'
    d.panel("timeseries", "Front door requests/s (by status)", [(f"dynamo_vllm:frontend_requests:rate1m{{{FRONT}}}", "{{instance}} {{model}} {{status}}")], unit="reqps", width=6)
    d.panel("timeseries", "Front door error ratio", [(f"dynamo_vllm:frontend_errors:ratio5m{{{FRONT}}}", "{{instance}} {{model}}")], unit="percentunit", width=6)
    d.panel("timeseries", "Time to first token, as clients see it", [(f"dynamo_vllm:frontend_time_to_first_token_seconds:{q}{{{FRONT}}}", f"{{{{instance}}}} {q}") for q in ("p50", "p95", "p99")] + [(f"dynamo_vllm:frontend_inter_token_latency_seconds:p95{{{FRONT}}}", "{{instance}} inter-token p95")], unit="s", width=6)
    d.panel("timeseries", "Routing: requests/s per worker, prefix-cache hits", [(f'sum by (instance, worker) (dynamo_vllm:requests:rate1m{{{SEL}, model_name=~"$model"}})', "{{instance}} w{{worker}} req/s"), (f"dynamo_vllm:frontend_prefix_cache_hit:ratio5m{{{FRONT}}}", "{{instance}} prompt tokens from the prefix cache")], width=6)

    d.row("KV cache and queue")
    d.panel("timeseries", "KV cache usage", [(f'dynamo_vllm:kv_cache_usage:ratio{{{SEL}, model=~"$model"}}', "{{instance}} w{{worker}}")], unit="percentunit", width=8)
    d.panel("timeseries", "Requests running / waiting", [(f'dynamo_vllm:requests_running{{{SEL}, model=~"$model"}}', "{{instance}} w{{worker}} running"), (f'dynamo_vllm:requests_waiting{{{SEL}, model=~"$model"}}', "{{instance}} w{{worker}} waiting")], width=8)
    d.panel("timeseries", "Canary checks (by result, 5 min)", [(f'sum by (instance, result) (increase(dynamo_component_canary_checks_total{{{SEL}, model=~"$model"}}[5m]))', "{{instance}} {{result}}")], width=8)

    d.row("Node and GPU")
    d.panel("timeseries", "Node CPU", [(f"dynamo_agent_node_cpu_utilization_ratio{{{INST}}}", "{{instance}}")], unit="percentunit", width=6)
    d.panel("timeseries", "Node memory available", [(f"dynamo_vllm:node_memory_available:ratio{{{INST}}}", "{{instance}}")], unit="percentunit", width=6)
    d.panel("timeseries", "GPU utilisation", [(f"dynamo_agent_gpu_utilization_ratio{{{INST}}}", "{{instance}} gpu{{gpu}}")], unit="percentunit", width=6)
    d.panel("timeseries", "GPU memory used / temperature", [(f"dynamo_agent_gpu_memory_used_bytes{{{INST}}}", "{{instance}} gpu{{gpu}} bytes"), (f"dynamo_agent_gpu_temperature_celsius{{{INST}}}", "{{instance}} gpu{{gpu}} °C")], width=6)

    d.row("Checkpoint/restore")
    d.panel("timeseries", "Checkpoint and restore durations", [(f"dynamo_agent_checkpoint_duration_seconds{{{SEL}}}", "{{instance}} w{{worker}} checkpoint"), (f"dynamo_agent_restore_duration_seconds{{{SEL}}}", "{{instance}} w{{worker}} restore")], unit="s", width=12)
    d.panel("timeseries", "Starts: cold against restored (1 h)", [(f"sum by (instance, result) (increase(dynamo_agent_restores_total{{{SEL}}}[1h]))", "{{instance}} {{result}}")], width=12)

    return {
        "uid": "dynamo-vllm", "title": "dynamo-vllm", "tags": ["dynamo-vllm", "vllm"],
        "timezone": "browser", "schemaVersion": 39, "version": 1, "editable": False,
        "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            variable("instance", "Node", "label_values(dynamo_agent_ready, instance)"),
            variable("model", "Model", 'label_values(vllm:generation_tokens_total{instance=~"$instance"}, model_name)'),
            variable("worker", "Worker", 'label_values(dynamo_agent_worker_up{instance=~"$instance"}, worker)'),
        ]},
        "annotations": {"list": []},
        "panels": d.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.read_text(encoding="utf-8") == text else 1)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
