"""Log records straight to journald with structured fields (its native protocol), so that
`journalctl -u dynamo-vllm@NAME WORKER=1` or `-o json` can pick one worker's events, an
exit code or a restart reason, and a traceback stays one entry.

The protocol is a datagram of `FIELD=value` lines on /run/systemd/journal/socket (a value
with a newline goes as `FIELD`, a little-endian 64-bit length and the bytes). A socket is
opened per record and closed at once: a worker's open sockets are part of what CRIU
checkpoints, and one connected to journald could not be restored. When the socket cannot
take a record (journald restarting, a record over the datagram limit) the record goes to
stderr as a priority-prefixed line, which journald files under the unit all the same.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Mapping
from typing import Any

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "dynamo-vllm"


def fields(worker: int | str | None = None, exit_code: int | None = None,
           reason: str | None = None) -> dict[str, Any]:
    """`extra=` for a log call: the fields an operator filters on."""
    found = {"WORKER": worker, "EXIT_CODE": exit_code, "REASON": reason}
    return {"journal": {k: str(v) for k, v in found.items() if v is not None}}


def _field(name: str, value: str) -> bytes:
    raw = value.encode("utf-8", "replace")
    if b"\n" in raw:
        return name.encode() + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"
    return name.encode() + b"=" + raw + b"\n"


def datagram(message: str, priority: int, extra: Mapping[str, str]) -> bytes:
    base = {"MESSAGE": message, "PRIORITY": str(priority), "SYSLOG_IDENTIFIER": IDENTIFIER}
    return b"".join(_field(name, value) for name, value in {**base, **extra}.items())


class JournalHandler(logging.Handler):
    """Each record one journal entry: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, LOGGER, CODE_*,
    the process's own fields (WORKER= in a worker) and the record's (`fields(...)`)."""

    def __init__(self, fallback: logging.Handler, process_fields: Mapping[str, str],
                 priority: Any):
        super().__init__()
        self.fallback = fallback
        self.process_fields = dict(process_fields)
        self.priority = priority

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            extra = {"LOGGER": record.name, "CODE_FILE": record.pathname,
                     "CODE_LINE": str(record.lineno), "CODE_FUNC": record.funcName,
                     **self.process_fields, **getattr(record, "journal", {})}
            payload = datagram(message, self.priority(record.levelno), extra)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(payload, JOURNAL_SOCKET)
        except OSError:
            self.fallback.handle(record)
        except Exception:
            self.handleError(record)
