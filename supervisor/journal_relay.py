"""`python -m dynamo_vllm.supervisor.journal_relay ROLE -- COMMAND...`: run COMMAND (with
this very pid) and file what it writes on stderr in the journal at each line's own priority.

Dynamo's frontend logs from Rust straight to its stderr: under the unit journald would file
an ERROR at the stream's priority (info), and `journalctl -p err` would miss it. Asked for
JSON lines (`DYN_LOGGING_CONSOLE_FORMAT=jsonl`, unless the operator chose a format), each
line carries its level; a forked relay reads the pipe that becomes COMMAND's stderr and
sends each line as one entry: MESSAGE "ROLE: message key=value...", PRIORITY from the
level, ROLE=, LOGGER= (the Rust target or Python logger), CODE_FILE= and CODE_LINE=. A line
that is not JSON (a Python warning) goes at warning, a Python traceback as one entry at err.

The relay is a process, not a thread of COMMAND: it neither waits on COMMAND's GIL nor dies
before COMMAND's last line. It ignores the stop signals its process group gets and exits at
the end of the pipe, when COMMAND and whatever inherited the pipe have exited. When stderr
is not the journal (a terminal, a file), COMMAND runs as it is, without a relay.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Iterator

from dynamo_vllm.contract import journal, logs

LEVELS = {"ERROR": 3, "WARN": 4, "WARNING": 4, "INFO": 6, "DEBUG": 7, "TRACE": 7}
# Plain lines on stderr (not JSON): a Python warning, a library's print.
PLAIN_PRIORITY = 4
TRACEBACK_PRIORITY = 3
# Shown as the entry's fields, not repeated in its message.
_PLACED = {"time", "level", "target", "message", "file", "line",
           "log.target", "log.file", "log.line", "log.module_path"}
_CHUNK = 65536


def entry(line: str, role: str) -> tuple[str, int, dict[str, str]]:
    """One JSON log line of Dynamo's as (message, priority, fields); a plain line at
    PLAIN_PRIORITY."""
    fields = {"ROLE": role}
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict) or "message" not in record:
        return f"{role}: {line}", PLAIN_PRIORITY, fields
    priority = LEVELS.get(str(record.get("level", "")).upper(), PLAIN_PRIORITY)
    where = {"LOGGER": record.get("log.target") or record.get("target"),
             "CODE_FILE": record.get("log.file") or record.get("file"),
             "CODE_LINE": record.get("log.line") or record.get("line")}
    fields.update({k: str(v) for k, v in where.items() if v is not None})
    details = "".join(f" {k}={v}" for k, v in record.items() if k not in _PLACED)
    return f"{role}: {record['message']}{details}", priority, fields


def entries(lines: Iterator[str], role: str) -> Iterator[tuple[str, int, dict[str, str]]]:
    """Each line an entry, but a Python traceback (from its header to the exception's line,
    the first that is not indented) one entry at TRACEBACK_PRIORITY."""
    held: list[str] = []
    for line in lines:
        if held:
            held.append(line)
            if line[:1] not in (" ", "\t", ""):
                yield _traceback(held, role)
                held = []
        elif line.startswith("Traceback (most recent call last):"):
            held = [line]
        else:
            yield entry(line, role)
    if held:
        yield _traceback(held, role)


def _traceback(lines: list[str], role: str) -> tuple[str, int, dict[str, str]]:
    return f"{role}: " + "\n".join(lines), TRACEBACK_PRIORITY, {"ROLE": role}


def read_lines(fd: int) -> Iterator[str]:
    """The pipe's lines until its end (a last line without a newline included)."""
    rest = b""
    while chunk := os.read(fd, _CHUNK):
        *lines, rest = (rest + chunk).split(b"\n")
        for raw in lines:
            yield raw.decode("utf-8", "replace").rstrip("\r")
    if rest:
        yield rest.decode("utf-8", "replace")


def relay(fd: int, role: str) -> None:
    """Send each entry to journald; one it cannot take goes to this process's stderr (the
    unit's stream) as a priority-prefixed line, which journald files all the same."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        for message, priority, fields in entries(read_lines(fd), role):
            try:
                sock.sendto(journal.datagram(message, priority, fields), journal.JOURNAL_SOCKET)
            except OSError:
                sys.stderr.write(logs.priority_prefixed(message, priority) + "\n")
                sys.stderr.flush()


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m dynamo_vllm.supervisor.journal_relay ROLE -- COMMAND...")
    role, command = argv[0], argv[2:]
    if logs.stderr_is_the_journal():
        os.environ.setdefault("DYN_LOGGING_CONSOLE_FORMAT", "jsonl")
        read_end, write_end = os.pipe()
        if os.fork() == 0:
            os.close(write_end)
            for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(stop, signal.SIG_IGN)
            try:
                relay(read_end, role)
            finally:
                os._exit(0)
        os.close(read_end)
        os.dup2(write_end, 2)
        os.close(write_end)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
