"""Helpers for tests that run real processes: free ports, configs, a worker handle."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import tomli_w

from dynamo_vllm.contract.discovery.etcd_gateway import prefix_end

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        import threading

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
        super().__init__(
            [sys.executable, "-m", "dynamo_vllm.cli.main", "run", "--config",
             str(config_path), "--runtime-dir", str(tmp / "runtime")],
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

    def cleanup(self) -> None:
        super().cleanup()
        self.notify.close()


def sse_data(resp: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of a server-sent event stream.

    Split on "\\n" only: httpx's iter_lines also splits on characters such as U+2028 and
    \\x1c, which a model may well generate inside a JSON string.
    """
    buffer = ""
    for text in resp.iter_text():
        buffer += text
        *lines, buffer = buffer.split("\n")
        for line in lines:
            if line.startswith("data: "):
                yield line[len("data: "):]
    if buffer.startswith("data: "):
        yield buffer[len("data: "):]


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

    def start(self, timeout: float = 20.0) -> EtcdServer:
        peer = f"http://127.0.0.1:{self.peer_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(
            ["etcd", "--name", "t", "--data-dir", str(self.data_dir),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}", "--logger=zap", "--log-level=warn"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see "
                                   f"{self.log_path}")
            try:
                return httpx.get(self.url + "/health", timeout=1).json().get("health") == "true"
            except (httpx.HTTPError, ValueError):
                return False

        wait_for(healthy, timeout, interval=0.05, what="etcd healthy")
        return self

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


def stream_completion(worker: WorkerProcess, results: list[dict], started: threading.Event) -> None:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 500, "ignore_eos": True,
            "stream": True, "temperature": 0}
    chunks, finish = 0, None
    with httpx.stream("POST", worker.base + "/v1/completions", json=body, timeout=120) as resp:
        status = resp.status_code
        for data in sse_data(resp):
            if data == "[DONE]":
                continue
            choice = json.loads(data)["choices"][0]
            chunks += 1
            started.set()
            finish = choice.get("finish_reason") or finish
    results.append({"status": status, "chunks": chunks, "finish": finish,
                    "ended": time.monotonic()})


def fuzz_openapi(url: str, max_examples: int = 20, timeout: float = 30.0) -> list[str]:
    """Drive every operation of the OpenAPI document at `url` with schemathesis, bodies and
    queries valid and not: each answer must be a documented code, never a 5xx, within
    `timeout`. Returns the failures, one line each (empty: all held).

    Written against schemathesis' strategies rather than its pytest plugin, whose lazy
    loader does not work with pytest 9.
    """
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import content_type_conformance, status_code_conformance

    schema = schemathesis.openapi.from_url(url)
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in schemathesis.GenerationMode:
            @settings(max_examples=max_examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck), print_blob=False)
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                response = case.call(timeout=timeout)
                documented = case.operation.definition.raw.get("responses", {})
                assert response.status_code < 500 or str(response.status_code) in documented, \
                    f"{response.status_code} {response.text[:200]}"
                case.validate_response(response, checks=[status_code_conformance,
                                                         content_type_conformance])

            try:
                check()
            except Unsatisfiable:
                pass  # nothing to get wrong: a route without parameters or body
            except (Exception, BaseExceptionGroup) as exc:  # one line each, then the next
                first = str(exc).strip().splitlines()[:6]
                failures.append(f"{operation.label} ({mode.value}): {type(exc).__name__}: "
                                + " / ".join(first))
    return failures
