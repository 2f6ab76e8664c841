"""The labels every worker series carries: Dynamo's hierarchy (namespace, component,
endpoint, model), then the operator's `metrics.labels`, which never replace one.

The worker puts them on its own `dynamo_component_*` series; the supervisor adds the same to
the `vllm:*` series it serves from the workers' files (vLLM cannot be told to), so both kinds
select alike in a query.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from dynamo_vllm.contract.config import Config
from dynamo_vllm.contract.protocol import Label

log = logging.getLogger(__name__)


def merge_labels(automatic: Mapping[str, str], user: Mapping[str, str],
                 warn: bool = True) -> dict[str, str]:
    """User labels added under the automatic ones: a user label never replaces one.

    Raises ValueError for labels Prometheus reserves (`le`, `quantile`).
    """
    reserved = sorted(set(user) & Label.RESERVED)
    if reserved:
        raise ValueError(f"label {reserved[0]!r} is reserved by Prometheus")
    merged = dict(automatic)
    for name, value in user.items():
        if name in merged:
            if warn:
                log.warning("metrics.labels.%s ignored: it would replace the automatic label",
                            name)
            continue
        merged[name] = value
    return merged


def worker_labels(config: Config, warn: bool = True) -> dict[str, str]:
    return merge_labels({
        Label.NAMESPACE: config.metrics.namespace,
        Label.COMPONENT: config.metrics.component,
        Label.ENDPOINT: config.metrics.endpoint,
        Label.MODEL: config.served_name,
    }, config.metric_labels, warn)
