"""What every setting is made of: its default, documentation, check and scope (which
process reads it), and the checks several sections share."""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Callable
from dataclasses import field, fields
from typing import Any

from dynamo_vllm.contract.protocol import Label

Check = Callable[[Any], str | None]


class Scope(enum.Enum):
    """Which process reads a setting; the worker's view of a config (what a change of it rolls
    the workers for, and what the checkpoint hash covers) is every WORKER setting."""

    WORKER = "worker"
    """The worker reads it and its process depends on it (the supervisor may read it too)."""
    SUPERVISOR = "supervisor"
    """Only the supervisor reads it: a change never restarts a worker."""
    EVERYWHERE = "everywhere"
    """Both read it at start, and neither needs a restart for it (the log level)."""


def setting(default: Any, doc: str, check: Check | None = None,
             scope: Scope = Scope.WORKER) -> Any:
    return field(default=default, metadata={"doc": doc, "check": check, "scope": scope})


def scope_of(section: type, key: str) -> Scope:
    for f in fields(section):
        if f.name == key:
            return f.metadata.get("scope", Scope.WORKER)
    raise KeyError(f"{section.__name__} has no setting {key!r}")


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be ≥ 0 (0 disables)"


def port(value: Any) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port from 1 to 65535"


def gpu_list(value: Any) -> str | None:
    if len(set(value)) != len(value):
        return "lists a GPU twice"
    return None


def log_level(value: Any) -> str | None:
    levels = ("debug", "info", "warning", "error")
    return None if value in levels else f"must be one of {', '.join(levels)}"


_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def labels(value: Any) -> str | None:
    for name, label_value in value.items():
        if not _LABEL_NAME.match(name) or name.startswith("__"):
            return f"{name!r} is not a valid Prometheus label name"
        if name in Label.RESERVED:
            return f"{name!r} is reserved by Prometheus"
        if not isinstance(label_value, str):
            return f"{name}: label values must be strings"
    return None


def absolute_or_empty(value: Any) -> str | None:
    return None if not value or os.path.isabs(value) else f"{value!r} is not an absolute path"
