"""What a fleet scrape target group read back from etcd may hold before /sd?scope=fleet
republishes it to Prometheus.

Whoever can write to etcd could otherwise plant relabelling labels (`__scheme__`,
`__metrics_path__`, `__param_*`, `__address__`) that send Prometheus' requests anywhere, or
targets that are not addresses. Only what `target_group` writes passes: host:port targets,
plain label names, and this project's own `__meta_dynamo_vllm_*` labels (which relabelling
drops unless a rule keeps them).
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger(__name__)

MAX_TARGETS = 16
MAX_LABELS = 32
MAX_VALUE = 256
_OWN_META = "__meta_dynamo_vllm_"
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,127}$")
_TARGET = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])"
                     r":[0-9]{1,5}$")
# Each refusal is logged once per process, not on every Prometheus refresh.
_logged: set[str] = set()


def group_problem(group: Any) -> str | None:
    """Why `group` may not be republished, or None."""
    if not isinstance(group, dict) or set(group) - {"targets", "labels"}:
        return "not a target group ({targets, labels})"
    targets = group.get("targets")
    if not isinstance(targets, list) or not 0 < len(targets) <= MAX_TARGETS:
        return f"targets must be a list of 1 to {MAX_TARGETS} addresses"
    for target in targets:
        if not isinstance(target, str) or not _TARGET.match(target) \
                or int(target.rsplit(":", 1)[1]) > 65535:
            return f"target {str(target)[:80]!r} is not host:port"
    labels = group.get("labels", {})
    if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
        return f"labels must be a table of at most {MAX_LABELS}"
    for name, value in labels.items():
        if not isinstance(name, str) or not _LABEL.match(name):
            return f"label {str(name)[:80]!r} is not a label name"
        if name.startswith("__") and not name.startswith(_OWN_META):
            return f"label {name!r} is reserved to Prometheus' relabelling"
        if not isinstance(value, str) or len(value) > MAX_VALUE:
            return f"label {name!r} must be a string of at most {MAX_VALUE} characters"
    return None


def valid_groups(groups: list[Any]) -> list[dict[str, Any]]:
    """The groups that pass; each refused one is logged (once) with its reason."""
    passed = []
    for group in groups:
        problem = group_problem(group)
        if problem is None:
            passed.append(group)
        elif problem not in _logged:
            _logged.add(problem)
            log.warning("fleet service discovery: refused a target group read from etcd: %s",
                        problem)
    return passed
