"""A real etcd for the tests (Debian's etcd, on loopback) and a watch on its keys."""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from dynamo_vllm.contract.discovery.etcd_gateway import prefix_end
from tests.harness.basics import wait_for


def low_free_port() -> int:
    """A free loopback port below the ephemeral range, where etcd's ports must be
    (reference/etcd.md: a kernel-chosen ephemeral port can be taken again before etcd binds)."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 32000")


class EtcdServer:
    """Debian's etcd as the test's own child, on loopback, in a scratch data dir."""

    def __init__(self, data_dir: Path, log_path: Path):
        self.data_dir = data_dir
        self.log_path = log_path
        self.client_port = low_free_port()
        self.peer_port = low_free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []

    def start(self, timeout: float = 20.0) -> EtcdServer:
        peer = f"http://127.0.0.1:{self.peer_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(
            ["etcd", "--name", "t", "--data-dir", str(self.data_dir),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}", "--logger=zap", "--log-level=warn",
             *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see "
                                   f"{self.log_path}")
            return self.healthy()

        wait_for(up, timeout, interval=0.05, what="etcd healthy")
        return self

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=1).json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = httpx.post(self.url + path, json=body, timeout=5)
        resp.raise_for_status()
        return dict(resp.json())

    def get_prefix(self, prefix: str) -> tuple[dict[str, Any], int]:
        """Records under `prefix` (decoded JSON) and the revision they were read at."""
        data = self.call("/v3/kv/range", {"key": b64(prefix), "range_end": prefix_end(prefix)})
        records = {base64.b64decode(kv["key"]).decode(): json.loads(base64.b64decode(kv["value"]))
                   for kv in data.get("kvs", [])}
        return records, int(data["header"]["revision"])


def b64(text: str) -> str:
    """etcd's JSON gateway takes keys and values in base64."""
    return base64.b64encode(text.encode()).decode()


class EtcdWatch:
    """A prefix watch in a thread, recording (monotonic time, PUT|DELETE, key) from a revision
    on: list first, then watch from that revision + 1, so nothing is missed."""

    def __init__(self, etcd: EtcdServer, prefix: str, start_revision: int):
        self.events: list[tuple[float, str, str]] = []
        self._etcd, self._prefix, self._start = etcd, prefix, start_revision
        self._created = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._client = httpx.Client(timeout=httpx.Timeout(5.0, read=None))

    def __enter__(self) -> EtcdWatch:
        self._thread.start()
        if not self._created.wait(10):
            raise RuntimeError("the etcd watch was not created within 10 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        body = {"create_request": {"key": b64(self._prefix),
                                   "range_end": prefix_end(self._prefix),
                                   "start_revision": self._start}}
        try:
            with self._client.stream("POST", self._etcd.url + "/v3/watch", json=body) as resp:
                for line in resp.iter_lines():
                    if not line.strip():
                        continue
                    result = json.loads(line).get("result", {})
                    if result.get("created"):
                        self._created.set()
                    for event in result.get("events", []):
                        key = base64.b64decode(event["kv"]["key"]).decode()
                        self.events.append((time.monotonic(), event.get("type", "PUT"), key))
        except (httpx.HTTPError, RuntimeError):
            return  # closed by __exit__

    def first(self, kind: str, after: float = 0.0) -> float | None:
        return next((t for t, k, _ in self.events if k == kind and t >= after), None)
