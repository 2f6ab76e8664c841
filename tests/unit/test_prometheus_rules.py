"""The Prometheus config, recording rules and alerts: promtool's checks and unit tests, and
every alert's runbook_url lands on a section of docs/operations.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "prometheus"

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None,
                                reason="promtool not installed (scripts/install-system-deps)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120,
                          cwd=PROM)


def alerts() -> list[dict]:
    groups = yaml.safe_load((PROM / "rules" / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_config_and_rules_pass_promtool() -> None:
    for args in (("check", "config", "prometheus.yml"), ("check", "config", "http-sd.yml"),
                 ("check", "config", "http-sd-etcd.yml"),
                 ("check", "rules", "rules/recording.yml", "rules/alerts.yml"),
                 ("test", "rules", "tests/alerts_test.yml")):
        result = promtool(*args)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    tests = yaml.safe_load((PROM / "tests" / "alerts_test.yml").read_text())["tests"]
    cases: dict[str, list[bool]] = {}
    for test in tests:
        for case in test["alert_rule_test"]:
            cases.setdefault(case["alertname"], []).append(bool(case["exp_alerts"]))
    names = {rule["alert"] for rule in alerts()}
    assert names == {"AgentDown", "AgentVanished", "WorkerDown", "FrontendDown", "FrontendErrors",
                     "WorkerCrashLooping", "EngineHung",
                     "KVCacheNearlyFull", "HighTTFT", "RestoreFellBackToColdStart", "GPUHot",
                     "NodeMemoryPressure"}
    for name in names:
        assert True in cases.get(name, []) and False in cases.get(name, []), name


def _anchor(heading: str) -> str:
    # GitHub's rule: lower case, drop punctuation, spaces to dashes.
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_runbook_link_lands_on_a_section() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    anchors = {_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}
    base = '{{ or $externalLabels.runbook_base "file:///usr/share/doc/dynamo-vllm" }}'
    for rule in alerts():
        # Absolute, as Alertmanager's integrations expect: the operator's base or the .deb's.
        link = rule["annotations"]["runbook_url"]
        path, _, anchor = link.partition("#")
        assert path == base + "/operations.md", link
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in docs/operations.md"
