"""Free ports, bounded waits, configs on disk and a child that holds files open."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the other end closed (or reset) this connection; never blocks."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout:g} s")


@contextlib.contextmanager
def child_holding(setup: str) -> Iterator[int]:
    """A Python child that runs `setup` (open or map files), then idles; yields its pid once
    the setup is done, and kills it after."""
    child = subprocess.Popen([sys.executable, "-c", f"import time\n{setup}\n"
                              "print('ready', flush=True); time.sleep(60)\n"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        yield child.pid
    finally:
        child.kill()
        child.wait(10)


def engine_config(model: Path, port: int, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config for the tiny model on the CPU engine, small enough for two at once."""
    config: dict[str, Any] = {
        "model": {"path": str(model), "served_name": "tiny"},
        "workers": {"count": 1, "base_port": port, "drain_timeout": 5.0},
        "health": {"interval": 1.0, "check_timeout": 10.0, "shutdown_timeout": 20.0},
        "engine": {"enforce_eager": True, "max_model_len": 512,
                   "kv_cache_memory_bytes": 64 * 2**20, "dtype": "float32",
                   "max_num_seqs": 8},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(config))
    return path


class FakeClock:
    """A monotonic clock a unit test moves by hand (`clock.now += 5`)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
