"""The frontend's series in the supervisor's one scrape target ([frontend] enabled).

Each scrape of /metrics reads the frontend's own /metrics (its requests, TTFT and ITL as the
client sees them, errors, router decisions) and serves its families with `role="frontend"`,
so they never mix with the workers' series; plus what the supervisor knows of the child:
`dynamo_agent_frontend_up` and `dynamo_agent_frontend_restarts_total`. A frontend that does
not answer costs its own series for that scrape, nothing else (GuardedCollectors).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from dynamo_vllm.supervisor.frontend import FrontendChild
from dynamo_vllm.supervisor.metrics import PREFIX

ROLE = "role"
SCRAPE_TIMEOUT_S = 2.0
# Families the supervisor serves from elsewhere: a second family of the same name would make
# the exposition invalid.
_OWN_PREFIXES = ("dynamo_agent_", "dynamo_component_", "vllm:", "python_", "process_")


class FrontendCollector:
    def __init__(self, frontend: FrontendChild, url: Callable[[], str]):
        self.frontend = frontend
        self.url = url

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}_frontend_up",
                               "1 while Dynamo's frontend serves the model.")
        up.add_metric([], 1 if self.frontend.serving else 0)
        yield up
        restarts = CounterMetricFamily(f"{PREFIX}_frontend_restarts",
                                       "Times the supervisor restarted the frontend.")
        restarts.add_metric([], max(0, self.frontend.lives - 1))
        yield restarts
        if self.frontend.proc is None or self.frontend.proc.returncode is not None:
            return
        with urllib.request.urlopen(self.url(), timeout=SCRAPE_TIMEOUT_S) as response:
            text = response.read().decode("utf-8", errors="replace")
        yield from relabelled(text)


def relabelled(text: str) -> Iterator[Metric]:
    """The families of an exposition, each sample with `role="frontend"` added."""
    for family in text_string_to_metric_families(text):
        if family.name.startswith(_OWN_PREFIXES):
            continue
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        copy.samples = [sample._replace(labels={**sample.labels, ROLE: "frontend"})
                        for sample in family.samples]
        yield copy
