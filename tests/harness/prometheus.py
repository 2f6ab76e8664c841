"""A real Prometheus (Debian's) with the repo's config and rules, scraping supervisors on
loopback, and the checks the live observability tests make against it."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.harness.basics import ROOT, free_port, wait_for

DASHBOARD_PATH = ROOT / "grafana" / "dashboards" / "dynamo-vllm.json"
RECORDING_PATH = ROOT / "prometheus" / "rules" / "recording.yml"


class PrometheusServer:
    """The repo's prometheus.yml and rules, pointed at `targets` and sped up: scrapes and
    rule groups every 2 s (production: 5 s and 15 s), so a rate or a recorded series has
    its samples soon."""

    def __init__(self, tmp: Path, targets: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
        rule_files = []
        for name in config["rule_files"]:
            rules = yaml.safe_load((ROOT / "prometheus" / name).read_text())
            for group in rules["groups"]:
                group["interval"] = "2s"
            (tmp / Path(name).name).write_text(yaml.safe_dump(rules))
            rule_files.append(str(tmp / Path(name).name))
        config["rule_files"] = rule_files
        # The job's timeout stays at its interval: a scrape on two cores busy with an engine
        # can take over a second.
        config["global"].update({"scrape_interval": "2s", "evaluation_interval": "2s"})
        config["scrape_configs"][0].update({"scrape_interval": "2s", "scrape_timeout": "2s"})
        config["scrape_configs"][0]["static_configs"][0]["targets"] = targets
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"], stdout=open(tmp / "prometheus.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:  # not listening yet
            return False

    def wait_ready(self, scrapes: int = 5) -> None:
        wait_for(self.ready, 60, what="prometheus ready")
        # Rates and quantiles need two scrapes with traffic in their window; a scrape that
        # times out on a starved machine is a missing sample, so wait for enough good ones
        # rather than for a fixed time.
        wait_for(lambda: self.query(f"sum_over_time(up[1m]) >= {scrapes}"), 120, interval=1,
                 what=f"{scrapes} successful scrapes")

    def query(self, expr: str) -> list[dict[str, Any]]:
        resp = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=30).json()
        assert resp["status"] == "success", (expr, resp)
        return list(resp["data"]["result"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def substitute(expr: str) -> str:
    """A dashboard query with its variables set to "all"."""
    return re.sub(r"\$(instance|model|worker)", ".*", expr)


def dashboard_targets(dashboard: dict[str, Any], keep: Callable[[str], bool]
                      ) -> list[tuple[str, str]]:
    """(panel title, query) of every panel target whose query `keep` accepts."""
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"]
            for target in panel.get("targets", []) if keep(target["expr"])]


def recording_rules(keep: Callable[[str], bool]) -> list[tuple[str, str]]:
    """(record, expr) of every recording rule whose record name `keep` accepts."""
    rules = yaml.safe_load(RECORDING_PATH.read_text())
    return [(rule["record"], rule["expr"]) for group in rules["groups"]
            for rule in group["rules"] if keep(rule["record"])]


def without_data(prom: PrometheusServer, dashboard: dict[str, Any],
                 keep: Callable[[str], bool]) -> list[str]:
    """The panel queries and recording rules (those `keep` accepts) that return nothing."""
    empty = [f"panel {title!r}: {expr}" for title, expr in dashboard_targets(dashboard, keep)
             if not prom.query(substitute(expr))]
    empty += [f"rule {record}: {expr}" for record, expr in recording_rules(keep)
              if not prom.query(record)]
    return empty
