"""The settings `systemctl reload` cannot apply, and why: a reload names each one that
changed (log and STATUS=) instead of leaving it silently unapplied.

Everything else a reload applies: the supervisor's own settings in place, the workers'
(scope WORKER) by rolling them one at a time. The keys below are read once, by something
that keeps running through a reload: the supervisor's listener and control gate, its
checkpoint machinery, and Dynamo's frontend, which is the node's one front door
(restarting it would be an outage, so a reload leaves it alone).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from dynamo_vllm.contract.config import Config
from dynamo_vllm.contract.settings import SECTIONS

LISTENER = "the supervisor's listener is bound at start"
CHECKPOINTS = "checkpointing is set up when the supervisor starts"
FRONTEND = "the frontend runs with what it read at its start"

GATE = "the supervisor's own control gate is set at start (the workers roll onto it)"

# Always read once by the supervisor.
AT_START = {"metrics.host": LISTENER, "metrics.port": LISTENER,
            "workers.control_from_network": GATE, "workers.control_token_file": GATE,
            "workers.user": "the workers' account is set when the supervisor starts",
            "checkpoint.enabled": CHECKPOINTS}
# Read once by the checkpoint machinery: they matter when checkpoints are (or were) on.
AT_CHECKPOINT_START = {f"checkpoint.{key}": CHECKPOINTS
                       for key in ("store", "keep", "criu", "criu_libdir", "timeout")}
# Read once by the frontend: they matter when it is (or was) on. The workers get the new
# [dynamo] values through the roll; the frontend keeps the old ones.
AT_FRONTEND_START = {
    **{f"frontend.{f.name}": FRONTEND for f in fields(SECTIONS["frontend"])},
    **{f"dynamo.{f.name}": FRONTEND for f in fields(SECTIONS["dynamo"])},
    "metrics.namespace": FRONTEND, "discovery.etcd_endpoints": FRONTEND,
}


def _value(config: Config, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(config, section), name)


def restart_only_changes(old: Config, new: Config) -> list[tuple[str, str]]:
    """(key, why) for each setting that differs between `old` and `new` and that only a
    restart applies, in the order of the config file."""
    relevant = dict(AT_START)
    if old.checkpoint.enabled or new.checkpoint.enabled:
        relevant.update(AT_CHECKPOINT_START)
    if old.frontend.enabled or new.frontend.enabled:
        relevant.update(AT_FRONTEND_START)
    changed = []
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            key = f"{section}.{f.name}"
            if key in relevant and _value(old, key) != _value(new, key):
                changed.append((key, relevant[key]))
    return changed
