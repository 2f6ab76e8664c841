"""How a checkpoint or a restore ended: the `result` label of their counters and of the
answers to POST /checkpoint and /restore."""

from __future__ import annotations

import enum


class CheckpointResult(enum.StrEnum):
    TAKEN = "taken"
    FAILED = "failed"
    SKIPPED = "skipped"
    """One for the worker's hash is stored already, or one is being taken."""


class RestoreResult(enum.StrEnum):
    RESTORED = "restored"
    COLD_START = "cold_start"
    """The restore failed and the worker started cold."""
    RESTORING = "restoring"
    """POST /restore's answer: the worker stops and is restored (not a counter label)."""


RESTORE_COUNTED = (RestoreResult.RESTORED, RestoreResult.COLD_START)
