"""Handles on the real processes tests start: a worker, a supervisor with a real
NOTIFY_SOCKET, and the process tree of either (killed whole at the end)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.harness.basics import wait_for


class ProcessTree:
    """A process started in its own session, with every descendant ever seen remembered,
    so a test can check that none is left and always kill them all at the end."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str]):
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in cleanup()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **env})
        self.seen_pids: set[int] = {self.proc.pid}

    def remember_children(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        self.seen_pids.update(p.pid for p in children)
        return children

    def alive_leftovers(self) -> list[int]:
        alive = []
        for pid in self.seen_pids:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        return alive

    def leftovers_after(self, grace: float = 10.0) -> list[str]:
        """The processes of the tree still alive `grace` seconds on, as "pid cmdline": what
        exits by itself once its parent is gone (multiprocessing's resource tracker, which
        reads its pipe to the end first) is given that long, anything else is a leftover."""
        deadline = time.monotonic() + grace
        while self.alive_leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        found = []
        for pid in self.alive_leftovers():
            with contextlib.suppress(psutil.Error):
                found.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())}")
        return found

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-8000:]

    def cleanup(self) -> None:
        self.remember_children()
        for pid in self.seen_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._log.close()


class WorkerProcess(ProcessTree):
    """A real worker (`python -m dynamo_vllm.agent`) in its own session, always cleaned up."""

    def __init__(self, config_path: Path, port: int, log_path: Path, index: int = 0,
                 env: dict[str, str] | None = None):
        super().__init__([sys.executable, "-m", "dynamo_vllm.agent", "--config",
                          str(config_path), "--index", str(index)], log_path, env or {})
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    def health(self) -> tuple[int, dict[str, Any]] | None:
        try:
            resp = httpx.get(self.base + "/health", timeout=2)
        except httpx.HTTPError:
            return None
        return resp.status_code, resp.json()

    def engine_core(self) -> psutil.Process:
        def find() -> psutil.Process | None:
            for child in self.remember_children():
                with contextlib.suppress(psutil.Error):
                    if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                        return child
            return None
        return wait_for(find, 30, what="EngineCore process")

    def wait_serving(self, timeout: float = 180) -> list[str]:
        """Wait until /health says serving; returns the states seen on the way."""
        states: list[str] = []

        def serving() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            answer = self.health()
            if answer is None:
                return False
            state = answer[1]["state"]
            if not states or states[-1] != state:
                states.append(state)
            return answer[0] == 200

        wait_for(serving, timeout, interval=0.1, what="worker serving")
        self.remember_children()
        return states

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker still running after {timeout:g} s:\n{self.log()}") from None


class NotifySocket:
    """A real sd_notify receiver: an AF_UNIX datagram socket recording every message."""

    def __init__(self, path: Path):

        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def fields(self) -> list[str]:
        """Every `KEY=value` line received, in order."""
        return [line for _, message in self.messages for line in message.split("\n")]

    def wait_field(self, prefix: str, timeout: float, after: int = 0) -> str:
        def find() -> str | None:
            for line in self.fields()[after:]:
                if line.startswith(prefix):
                    return line
            return None
        return wait_for(find, timeout, interval=0.1, what=f"sd_notify {prefix!r}")

    def close(self) -> None:
        self._closed = True
        self.sock.close()


class SupervisorProcess(ProcessTree):
    """A real `dynamo-vllm run` in its own session, with a notify socket; always cleaned up."""

    def __init__(self, config_path: Path, tmp: Path, metrics_port: int,
                 env: dict[str, str] | None = None):
        self.notify = NotifySocket(tmp / "notify.sock")
        self.runtime = tmp / "runtime"
        super().__init__(
            [sys.executable, "-m", "dynamo_vllm.cli.main", "run", "--config",
             str(config_path), "--runtime-dir", str(self.runtime)],
            tmp / "supervisor.log", {"NOTIFY_SOCKET": str(self.notify.path), **(env or {})})
        self.base = f"http://127.0.0.1:{metrics_port}"

    def status(self) -> dict[str, Any] | None:
        try:
            return httpx.get(self.base + "/status", timeout=3).json()
        except (httpx.HTTPError, ValueError):
            return None

    def worker(self, index: int) -> dict[str, Any]:
        status = self.status() or {"workers": []}
        return next(w for w in status["workers"] if w["worker"] == index)

    def wait_workers(self, predicate: Callable[[list[dict[str, Any]]], bool],
                     timeout: float, what: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited with {self.proc.returncode}:\n"
                                     f"{self.log()}")
            status = self.status()
            # Before the supervisor adds its workers, the list is empty.
            return status if status and status["workers"] and predicate(status["workers"]) \
                else None
        return wait_for(check, timeout, interval=0.3, what=what)

    def metrics(self) -> str:
        return httpx.get(self.base + "/metrics", timeout=10).text

    def cli_env(self) -> dict[str, str]:
        """The environment of a CLI command aimed at this supervisor: where its runtime
        directory (and so its control token) is."""
        return {**os.environ, "DYNAMO_VLLM_RUNTIME_DIR": str(self.runtime)}

    def auth(self) -> dict[str, str]:
        """The header control needs: the token the supervisor wrote at its start."""
        return {"Authorization": "Bearer " + (self.runtime / "control.token").read_text().strip()}

    def cleanup(self) -> None:
        super().cleanup()
        self.notify.close()
