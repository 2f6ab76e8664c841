"""sd_notify over real sockets that misbehave: the supervisor's sends never raise or block."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from dynamo_vllm.supervisor.notify import Notifier


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    return sock


def test_a_receiver_that_stops_reading_never_blocks(receiver: socket.socket) -> None:
    notifier = Notifier()
    started = time.monotonic()
    for i in range(5000):  # far more than the receiver's queue holds
        notifier.status(f"message {i} " + "x" * 200)
        notifier.watchdog()
    assert time.monotonic() - started < 5
    receiver.setblocking(False)
    assert receiver.recv(65536).startswith(b"STATUS=message 0")  # the first ones arrived
    receiver.close()


def test_a_socket_that_vanished_is_ignored(receiver: socket.socket, tmp_path: Path) -> None:
    notifier = Notifier()
    notifier.ready("serving")
    receiver.close()
    os.unlink(tmp_path / "notify.sock")
    started = time.monotonic()
    notifier.watchdog()
    notifier.status("still going")
    notifier.stopping("stopping")
    assert time.monotonic() - started < 1
    assert notifier.watchdog_pings == 1


def test_a_socket_missing_from_the_start_is_ignored(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-here.sock"))
    notifier = Notifier()
    notifier.ready("serving")
    notifier.watchdog()
    monkeypatch.setenv("NOTIFY_SOCKET", "@abstract-name-nobody-binds")
    Notifier().status("fine")
