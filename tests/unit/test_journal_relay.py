"""The journal relay of the frontend's stderr: Dynamo's JSON lines at their own priority
and fields, a traceback as one entry, and the whole path in a real process (fork, exec
with the same pid, the relay outliving the command's last line)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_vllm.contract import journal
from dynamo_vllm.supervisor import journal_relay
from tests.unit.test_journal import parse

ERROR_LINE = json.dumps({
    "time": "2026-12-08T00:00:06.827423Z", "level": "ERROR",
    "file": "/opt/dynamo/lib/llm/src/http/service/service_v2.rs", "line": 1432,
    "target": "dynamo_llm::http::service::service_v2", "message": "http response sent",
    "status": "404", "uri": "/v1/completions"})
PYTHON_LINE = json.dumps({
    "time": "2026-12-07T23:59:47.094127Z", "level": "INFO", "target": "log",
    "message": "Request migration disabled (limit: 0)", "log.file": "/x/dynamo/frontend/main.py",
    "log.line": 381, "log.target": "main.async_main"})


def test_a_json_line_keeps_its_level_and_where_it_came_from() -> None:
    message, priority, fields = journal_relay.entry(ERROR_LINE, "frontend")
    assert priority == 3
    assert message == "frontend: http response sent status=404 uri=/v1/completions"
    assert fields == {"ROLE": "frontend", "LOGGER": "dynamo_llm::http::service::service_v2",
                      "CODE_FILE": "/opt/dynamo/lib/llm/src/http/service/service_v2.rs",
                      "CODE_LINE": "1432"}
    # Python's records through Dynamo's logger: the Python logger and file, not "log".
    message, priority, fields = journal_relay.entry(PYTHON_LINE, "frontend")
    assert (message, priority) == ("frontend: Request migration disabled (limit: 0)", 6)
    assert (fields["LOGGER"], fields["CODE_LINE"]) == ("main.async_main", "381")
    warn = json.dumps({"level": "WARN", "message": "slow", "target": "t"})
    assert journal_relay.entry(warn, "frontend")[1] == 4


@pytest.mark.parametrize("line", ["UserWarning: something old", "[1, 2]", '{"no": "message"}'])
def test_a_plain_line_goes_at_warning(line: str) -> None:
    assert journal_relay.entry(line, "frontend") == (f"frontend: {line}",
                                                     journal_relay.PLAIN_PRIORITY,
                                                     {"ROLE": "frontend"})


def test_a_traceback_is_one_entry_at_err() -> None:
    lines = [PYTHON_LINE, "Traceback (most recent call last):", '  File "x.py", line 1, in <m>',
             "    raise SystemExit(boom())", "RuntimeError: boom", ERROR_LINE,
             "Traceback (most recent call last):", '  File "y.py", line 2']
    found = list(journal_relay.entries(iter(lines), "frontend"))
    assert [priority for _, priority, _ in found] == [6, 3, 3, 3]
    assert found[1][0] == "frontend: " + "\n".join(lines[1:5])
    assert found[3][0] == "frontend: " + "\n".join(lines[6:])  # cut off by the end: still sent


def test_lines_split_across_reads_are_whole(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "journal.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journald:
        journald.bind(str(path))
        journald.settimeout(5)
        monkeypatch.setattr(journal, "JOURNAL_SOCKET", str(path))
        monkeypatch.setattr(journal_relay, "_CHUNK", 7)  # every line crosses reads
        read_end, write_end = os.pipe()
        os.write(write_end, (ERROR_LINE + "\n" + PYTHON_LINE + "\nno newline").encode())
        os.close(write_end)
        journal_relay.relay(read_end, "frontend")
        os.close(read_end)
        got = [parse(journald.recv(65536)) for _ in range(3)]
    assert [(g["PRIORITY"], g["ROLE"], g["SYSLOG_IDENTIFIER"]) for g in got] == \
        [("3", "frontend", "dynamo-vllm"), ("6", "frontend", "dynamo-vllm"),
         ("4", "frontend", "dynamo-vllm")]
    assert got[2]["MESSAGE"] == "frontend: no newline"


# The command: says its pid and log format, writes a JSON error and a plain line on
# stderr, exits 7.
COMMAND = f"""import os, sys
print(os.getpid(), os.environ.get("DYN_LOGGING_CONSOLE_FORMAT"), flush=True)
sys.stderr.write({ERROR_LINE!r} + "\\nplain words\\n")
sys.stderr.flush()
sys.exit(7)
"""


def run_relayed(tmp_path: Path, as_journal: bool) -> tuple[subprocess.Popen[str], str, str]:
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        info = os.fstat(err.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}" if as_journal
               else ""}
        env.pop("DYN_LOGGING_CONSOLE_FORMAT", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "dynamo_vllm.supervisor.journal_relay", "frontend", "--",
             sys.executable, "-c", COMMAND],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        out, _ = proc.communicate(timeout=60)
    return proc, out, err_path.read_text()


@pytest.mark.skipif(os.path.exists(journal.JOURNAL_SOCKET),
                    reason="a journald runs here: the entries would go to it")
def test_the_command_keeps_the_pid_and_its_lines_come_through(tmp_path: Path) -> None:
    """Under a journal stream with no journald to take the entries (this machine's tests):
    each comes out as a priority-prefixed line on the unit's stream, which journald files at
    that priority; the command is the process started (its pid, its exit status)."""
    proc, out, err = run_relayed(tmp_path, as_journal=True)
    pid, console_format = out.split()
    assert (int(pid), proc.returncode, console_format) == (proc.pid, 7, "jsonl")
    # The relay ends at the end of the pipe, after the command: its lines are all there.
    assert "<3>frontend: http response sent status=404 uri=/v1/completions\n" in err, err
    assert "<4>frontend: plain words\n" in err, err


def test_without_the_journal_the_command_runs_as_it_is(tmp_path: Path) -> None:
    proc, out, err = run_relayed(tmp_path, as_journal=False)
    pid, console_format = out.split()
    assert (int(pid), proc.returncode, console_format) == (proc.pid, 7, "None")
    assert err == ERROR_LINE + "\nplain words\n"
