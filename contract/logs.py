"""Logging set-up shared by the supervisor and the workers: one event per record.

Under systemd (`JOURNAL_STREAM` set) each record goes to journald with its priority and
structured fields (contract/journal.py: WORKER=, EXIT_CODE=, REASON=), falling back to a
line that starts with its syslog priority (`<3>` for errors); elsewhere lines carry a
timestamp. vLLM configures its own logger in every process it starts (the API server,
EngineCore, its workers); `route_vllm_logging` hands it ours through its supported hook,
VLLM_LOGGING_CONFIG_PATH, so an engine's traceback reaches `journalctl -p err` too.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from dynamo_vllm.contract.journal import JournalHandler

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


def priority_prefixed(text: str, priority: int) -> str:
    """Every line of `text` with its syslog priority in front (`<3>`), as journald reads a
    stream: a multi-line message keeps its priority on each line."""
    prefix = f"<{priority}>"
    return prefix + text.replace("\n", "\n" + prefix)


class JournalFormatter(logging.Formatter):
    """Prefixes the syslog priority and keeps each record on one line."""

    def format(self, record: logging.LogRecord) -> str:
        return priority_prefixed(super().format(record), syslog_priority(record.levelno))


def stderr_is_the_journal() -> bool:
    """systemd's own test: JOURNAL_STREAM names the device and inode of the stream it
    connected; stderr redirected elsewhere (a file, a pipe) is not the journal."""
    try:
        info = os.fstat(2)
    except OSError:
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{info.st_dev}:{info.st_ino}"


def handler(name: str = "dynamo-vllm", worker: str | None = None) -> logging.Handler:
    """The handler of this process's records: to journald when stderr is the journal,
    else stderr. `worker`: the worker's index, a field on each of its records."""
    stream = logging.StreamHandler(sys.stderr)
    if not stderr_is_the_journal():
        stream.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s"))
        return stream
    stream.setFormatter(JournalFormatter(f"{name}: %(name)s: %(message)s"))
    journal = JournalHandler(stream, {"WORKER": worker} if worker is not None else {},
                             syslog_priority)
    journal.setFormatter(logging.Formatter(f"{name}: %(name)s: %(message)s"))
    return journal


def route_vllm_logging(directory: Path, name: str, worker: str, level: str) -> None:
    """Make vLLM's logger use `handler(name, worker)` in this process and in every process
    the engine starts (they inherit the environment and read the file at import)."""
    path = directory / "vllm-logging.json"
    path.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "handlers": {"agent": {"()": f"{__name__}.handler", "name": name, "worker": worker}},
        "loggers": {"vllm": {"handlers": ["agent"], "level": level.upper(),
                             "propagate": False}}}))
    os.environ["VLLM_CONFIGURE_LOGGING"] = "1"
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(path)


def setup(level: str = "info", name: str = "dynamo-vllm", worker: str | None = None) -> None:
    root = logging.getLogger()
    root.handlers[:] = [handler(name, worker)]
    root.setLevel(level.upper())
    # httpx logs every request at INFO: etcd keep-alives would fill the journal every
    # second or two. Their failures are logged by the agent, with what they mean.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
