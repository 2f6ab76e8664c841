"""Records to journald's native protocol (a real datagram socket stands in for journald):
the priority, the identifier, the structured fields, a traceback as one entry, and the
priority-prefixed line on stderr when the socket cannot take it."""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamo_vllm.contract import journal, logs


def stream_of_stderr() -> str:
    """What systemd would put in JOURNAL_STREAM if fd 2 were its stream."""
    info = os.fstat(2)
    return f"{info.st_dev}:{info.st_ino}"


def parse(datagram: bytes) -> dict[str, str]:
    fields, rest = {}, datagram
    while rest:
        line, _, after = rest.partition(b"\n")
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields[name.decode()] = value.decode()
            rest = after
        else:  # NAME \n length (u64 LE) value \n
            size = struct.unpack("<Q", after[:8])[0]
            fields[line.decode()] = after[8:8 + size].decode()
            rest = after[8 + size + 1:]
    return fields


@pytest.fixture
def journald(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "journal.socket"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setattr(journal, "JOURNAL_SOCKET", str(path))
    monkeypatch.setenv("JOURNAL_STREAM", stream_of_stderr())
    yield sock
    sock.close()


def test_records_carry_their_fields(journald: socket.socket) -> None:
    log = logging.getLogger("dynamo_vllm.test.journal")
    log.handlers[:] = [logs.handler("worker1", worker="1")]
    log.propagate = False
    log.error("worker %s ended (%s)", "1", "engine dead",
              extra=journal.fields("1", 3, "engine_dead"))
    fields = parse(journald.recv(65536))
    assert fields["MESSAGE"] == "worker1: dynamo_vllm.test.journal: worker 1 ended (engine dead)"
    assert (fields["PRIORITY"], fields["SYSLOG_IDENTIFIER"]) == ("3", "dynamo-vllm")
    assert (fields["WORKER"], fields["EXIT_CODE"], fields["REASON"]) == ("1", "3", "engine_dead")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    fields = parse(journald.recv(65536))
    assert "Traceback" in fields["MESSAGE"] and "ValueError: boom" in fields["MESSAGE"]
    assert fields["PRIORITY"] == "3" and fields["WORKER"] == "1"


def test_without_journald_a_prefixed_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(journal, "JOURNAL_SOCKET", str(tmp_path / "absent"))
    monkeypatch.setenv("JOURNAL_STREAM", stream_of_stderr())
    log = logging.getLogger("dynamo_vllm.test.journal.fallback")
    log.handlers[:] = [logs.handler("dynamo-vllm@x")]
    log.propagate = False
    log.warning("still told")
    assert capsys.readouterr().err == "<4>dynamo-vllm@x: dynamo_vllm.test.journal.fallback: " \
                                      "still told\n"


def test_stderr_elsewhere_is_not_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")  # a stream, but not fd 2's
    assert not logs.stderr_is_the_journal()
    assert isinstance(logs.handler(), logging.StreamHandler)


def test_vllms_logger_uses_ours_in_a_new_process(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """As in EngineCore: a fresh interpreter applies vLLM's logging config, built from the
    environment (what EngineCore gets in its VllmConfig), and logs through ours."""
    import subprocess
    import sys

    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    saved = {k: os.environ.get(k) for k in ("VLLM_CONFIGURE_LOGGING", "VLLM_LOGGING_CONFIG_PATH")}
    try:
        logs.route_vllm_logging(tmp_path, "worker2", "2", "info")
        out = subprocess.run([sys.executable, "-c", "from vllm.config.logging import "
                              "LoggingConfig; from vllm.logger import configure_logging, "
                              "init_logger; configure_logging(LoggingConfig()); "
                              "init_logger('vllm.v1.engine').error('engine failed')"],
                             capture_output=True, text=True, timeout=120, env=dict(os.environ))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    assert out.returncode == 0, out.stderr
    assert " ERROR worker2 vllm.v1.engine: engine failed" in out.stderr, out.stderr
