"""Logging set-up shared by the supervisor and the workers: one event per line.

Under systemd (`JOURNAL_STREAM` set) each line starts with its syslog priority (`<3>` for
errors), so `journalctl -p err` filters by level; elsewhere lines carry a timestamp.
"""

from __future__ import annotations

import logging
import os
import sys

_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def syslog_priority(levelno: int) -> int:
    for threshold in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= threshold:
            return _SYSLOG_PRIORITY[threshold]
    return 7


class JournalFormatter(logging.Formatter):
    """Prefixes the syslog priority and keeps each record on one line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{syslog_priority(record.levelno)}>"
        return prefix + text.replace("\n", "\n" + prefix)


def setup(level: str = "info", name: str = "dynamo-vllm") -> None:
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    handler = logging.StreamHandler(sys.stderr)
    if under_journal:
        handler.setFormatter(JournalFormatter(f"{name}: %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO: etcd keep-alives would fill the journal every
    # second or two. Their failures are logged by the agent, with what they mean.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
