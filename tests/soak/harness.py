"""The fault-injection soak: a real supervisor with real engines, under load, under faults.

`Soak` starts etcd, a checkpoint store on a small tmpfs, and `dynamo-vllm run` with two
workers of the tiny model on the CPU engine (checkpoints on, so that most recoveries are
restores). Load runs throughout (tests/soak/load.py). Faults (tests/soak/faults.py) are
injected one at a time, in an order drawn from a fixed seed, each once the instance is
whole again. Throughout, an observer polls /status and checks the invariants; at the end
the report (tests/soak/report.py) is a Markdown table of faults and requests, and the list
of violations, which a test asserts is empty.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from dynamo_vllm.supervisor.shm import shm_files, tree_pids
from tests.harness import (
    EtcdServer,
    SupervisorProcess,
    engine_config,
    free_port,
    wait_for,
    write_config,
)
from tests.soak.faults import FAULTS
from tests.soak.frontend import FRONTEND_FAULTS, frontend_sections, frontend_whole
from tests.soak.injection import inject
from tests.soak.load import LOST, Load
from tests.soak.report import FaultResult, Resources, render_report, resource_violations

STORE_SIZE = "4g"
EVERY_FAULT = (*FAULTS, *FRONTEND_FAULTS)
BY_NAME = {fault.name: fault for fault in EVERY_FAULT}


@dataclass
class SoakSettings:
    seed: int = 7
    # 0: every fault once (the CI version); otherwise faults drawn at random until then.
    duration: float = 0.0
    faults: tuple[str, ...] = tuple(f.name for f in EVERY_FAULT)
    clients: int = 2
    # The load through Dynamo's frontend, a child of the supervisor (tests/soak/frontend.py).
    frontend: bool = False
    checkpoints: bool = True


@dataclass
class Soak:
    model: Path
    criu: Path
    tmp: Path
    settings: SoakSettings = field(default_factory=SoakSettings)
    workers: int = 2

    def __post_init__(self) -> None:
        self.runtime = self.tmp / "runtime"
        self.store = self.tmp / "store"
        # Where the workers publish themselves (the supervisor's scrape target lives under
        # "instances-scrape-targets/", outside this prefix).
        self.etcd_prefix = "/dynamo-vllm/v1/instances/"
        self.lease_ttl = 5
        self.notes: list[str] = []
        self.violations: list[str] = []
        self.results: list[FaultResult] = []
        self.skipped: dict[str, str] = {}
        self.samples: list[tuple[float, dict[int, dict[str, Any]] | None]] = []
        self._latest: dict[int, dict[str, Any]] = {}
        self._frontend: dict[str, Any] = {}
        self._stop = threading.Event()
        self._observer: threading.Thread | None = None
        self.supervisor: SupervisorProcess | None = None
        self.load: Load | None = None
        self.shm_before: set[str] = set()
        # /dev/shm names this soak's processes were seen to hold: other tests' engines may
        # write there at the same time (scripts/run-tests), and their files are not ours.
        self.shm_ours: set[str] = set()
        self.whole_since: float | None = None
        self._http: httpx.Client | None = None

    # ------------------------------------------------------------ set-up and tear-down

    def config(self) -> dict[str, Any]:
        self.metrics_port = free_port()
        sections: dict[str, dict[str, Any]] = {}
        if self.settings.checkpoints:
            sections["checkpoint"] = {"enabled": True, "store": str(self.store),
                                      "criu": str(self.criu), "timeout": 120.0, "keep": 4}
        if self.settings.frontend:
            self.frontend_port = free_port()
            sections.update(frontend_sections(self, self.frontend_port))
        config = engine_config(
            self.model, free_port(),
            workers={"count": self.workers, "min_ready": 1, "drain_timeout": 2.0,
                     "stop_timeout": 20.0, "restart_backoff": 0.5,
                     # Faults come far faster here than on any real node.
                     "crash_loop_restarts": 1000},
            health={"interval": 0.5, "check_timeout": 5.0, "canary_idle": 2.0,
                    "canary_timeout": 2.0, "canary_failures": 2, "poll_interval": 0.5,
                    "poll_timeout": 2.0, "poll_failures": 3},
            metrics={"port": self.metrics_port},
            discovery={"backend": "etcd", "etcd_endpoints": [self.etcd.url],
                       "lease_ttl": self.lease_ttl},
            **sections)
        config["workers"]["base_port"] = free_port()
        return config

    def start(self) -> None:
        self.shm_before = set(os.listdir("/dev/shm"))
        self.etcd = EtcdServer(self.tmp / "etcd", self.tmp / "etcd.log").start()
        self.store.mkdir(mode=0o700)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STORE_SIZE},mode=0700", "tmpfs",
                        str(self.store)], check=True, timeout=30)
        self.config_path = write_config(self.tmp / "tiny.toml", self.config())
        # Ports: workers bind base_port + i; both were checked free above.
        self.supervisor = SupervisorProcess(self.config_path, self.tmp, self.metrics_port)
        self._observer = threading.Thread(target=self._observe, name="soak-observer",
                                          daemon=True)
        self._observer.start()
        self.wait(self.whole, 600, "every worker serving (restored from its checkpoint, "
                  "behind the frontend, as the settings ask)", interval=0.5)
        self.load = Load(self.targets, "tiny", clients=self.settings.clients,
                         seed=self.settings.seed)

    def stop(self) -> Resources | None:
        """Stop the load, then the supervisor; the processes it left, if any, are killed
        and reported."""
        after = None
        if self.load is not None:
            self.load.stop()
        if self.supervisor is not None:
            with contextlib.suppress(Exception):
                time.sleep(2.0)
                after = self.resources()
            self._stop.set()
            if self._observer is not None:
                self._observer.join(10)
            self.supervisor.remember_children()
            self.note_shm()
            self.supervisor.proc.terminate()
            try:
                code = self.supervisor.proc.wait(120)
                if code != 0:
                    self.violations.append(f"the supervisor exited {code} on SIGTERM")
            except subprocess.TimeoutExpired:
                self.violations.append("the supervisor did not stop within 120 s")
            time.sleep(1.0)
            left = self.supervisor.alive_leftovers()
            if left:
                self.violations.append(f"processes left after the supervisor stopped: {left}")
            self.supervisor.cleanup()
        leaked = sorted(self.shm_new())
        if leaked:
            self.violations.append(f"/dev/shm files left: {leaked[:5]} ({len(leaked)})")
        with contextlib.suppress(Exception):
            self.etcd.stop()
        subprocess.run(["umount", "-l", str(self.store)], check=False, timeout=30)
        return after

    # ------------------------------------------------------------ what the supervisor says

    def _observe(self) -> None:
        assert self.supervisor is not None
        with httpx.Client(timeout=3.0) as client:
            while not self._stop.is_set():
                now = time.monotonic()
                try:
                    status = client.get(self.supervisor.base + "/status").json()
                    workers = {w["worker"]: w for w in status["workers"]}
                    self._frontend = dict(status.get("frontend") or {})
                except (httpx.HTTPError, ValueError, KeyError):
                    workers = None
                self.supervisor.remember_children()
                if len(self.samples) % 4 == 0:
                    self.note_shm()
                self.samples.append((now, workers))
                if workers is not None:
                    self._latest = workers
                    self._check_min_ready(now, workers)
                elif self.whole_since is not None:
                    self.violations.append(f"t={self.t(now):.1f}s: /status did not answer")
                self._stop.wait(0.25)

    def _check_min_ready(self, now: float, workers: dict[int, dict[str, Any]]) -> None:
        available = sum(1 for w in workers.values() if w["state"] in ("serving", "sleeping"))
        if self.whole_since is None:
            if available == self.workers:
                self.whole_since = now
            return
        if available < 1:
            self.violations.append(f"t={self.t(now):.1f}s: no worker serving "
                                   f"({ {i: w['state'] for i, w in workers.items()} })")

    def t(self, when: float) -> float:
        return when - (self.whole_since or when)

    def worker(self, index: int) -> dict[str, Any]:
        return dict(self._latest.get(index) or {"state": "unknown", "pid": None,
                                                "restarts": -1, "restored": False})

    def frontend(self) -> dict[str, Any]:
        return dict(self._frontend)

    def whole(self) -> bool:
        settings = self.settings
        return len(self._latest) == self.workers and all(
            w["state"] == "serving" and (w["restored"] or not settings.checkpoints)
            for w in self._latest.values()) and (
            not settings.frontend or frontend_whole(self._frontend, self.workers))

    def targets(self) -> dict[int, int]:
        """Where the load goes now: {worker: port} of the serving workers, or the frontend's
        port (as worker -1) while it serves."""
        if self.settings.frontend:
            return {-1: self.frontend_port} if self._frontend.get("state") == "serving" else {}
        return {i: w["port"] for i, w in self._latest.items() if w["state"] == "serving"}

    def scrape(self) -> str:
        assert self.supervisor is not None
        # One client for the whole soak: a new one per call costs a TLS context each time.
        if self._http is None:
            self._http = httpx.Client(timeout=10.0)
        return self._http.get(self.supervisor.base + "/metrics").text

    def metric_value(self, name: str, labels: dict[str, str]) -> float:
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        for line in self.scrape().splitlines():
            if line.startswith(name + "{") and all(w in line for w in wanted):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command, rest = args[0], list(args[1:])
        argv = [sys.executable, "-m", "dynamo_vllm.cli.main", command,
                str(self.config_path), *rest]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "DYNAMO_VLLM_RUNTIME_DIR": str(self.runtime)})
        if check and result.returncode != 0:
            raise AssertionError(f"dynamo-vllm {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    @staticmethod
    def wait(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.1) -> Any:
        return wait_for(predicate, timeout, interval=interval, what=what)

    def resources(self) -> Resources:
        assert self.supervisor is not None
        supervisor = psutil.Process(self.supervisor.proc.pid)
        files = list((self.runtime / "metrics").glob("*/*.db"))
        dead = 0
        for path in files:
            match = re.search(r"_(\d+)\.db$", path.name)
            if match and not psutil.pid_exists(int(match.group(1))):
                dead += 1
        self.note_shm()
        shm = len(self.shm_new())
        return Resources(fds=supervisor.num_fds(), rss=supervisor.memory_info().rss,
                         metric_files=len(files), dead_metric_files=dead, shm=shm,
                         descendants=len(supervisor.children(recursive=True)))

    def note_shm(self) -> None:
        """Remember the /dev/shm files the supervisor's tree holds now."""
        if self.supervisor is not None:
            held = shm_files(tree_pids(self.supervisor.proc.pid))
            self.shm_ours |= {os.path.basename(path) for path in held} - self.shm_before

    def shm_new(self) -> set[str]:
        """This soak's files in /dev/shm that were not there at its start."""
        return set(os.listdir("/dev/shm")) & self.shm_ours

    # ------------------------------------------------------------ faults

    @property
    def health(self) -> dict[str, float]:
        import tomllib

        return dict(tomllib.loads(self.config_path.read_text())["health"])

    def schedule(self) -> list[tuple[str, int]]:
        rng = random.Random(self.settings.seed)
        names = [n for n in self.settings.faults if n in BY_NAME]
        if self.settings.duration <= 0:
            rng.shuffle(names)
            return [(name, rng.randrange(self.workers)) for name in names]
        return [(rng.choice(names), rng.randrange(self.workers)) for _ in range(10_000)]

    def run(self) -> tuple[Resources, Resources | None]:
        """Inject the faults; returns the resources before the first and after the last."""
        assert self.load is not None
        self.load.start()
        time.sleep(3.0)
        before = self.resources()
        ends = time.monotonic() + self.settings.duration
        for name, worker in self.schedule():
            if self.settings.duration > 0 and time.monotonic() > ends:
                break
            fault = BY_NAME[name]
            reason = fault.available(self)
            if reason:
                self.skipped[name] = reason
                continue
            self.results.append(inject(self, fault, worker))
        return before, None


def run_soak(model: Path, criu: Path, tmp: Path, settings: SoakSettings) -> tuple[str, Soak]:
    soak = Soak(model, criu, tmp, settings)
    after: Resources | None = None
    before: Resources | None = None
    try:
        soak.start()
        before, _ = soak.run()
    finally:
        after = soak.stop()
    assert before is not None
    soak.violations += resource_violations(before, after)
    if soak.load is not None:
        lost = [o for o in soak.load.outcomes if o.result == LOST]
        if lost:
            soak.violations.append(f"{len(lost)} request(s) lost, first: worker "
                                   f"{lost[0].worker} at t={soak.t(lost[0].started):.1f}s: "
                                   f"{lost[0].detail}")
    assert soak.load is not None
    report = render_report(soak.results, soak.skipped, soak.load, (before, after), soak.notes,
                           soak.violations)
    (tmp / "report.md").write_text(report)
    return report, soak


def copy_logs(soak: Soak, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("supervisor.log", "etcd.log", "report.md"):
        with contextlib.suppress(FileNotFoundError):
            shutil.copy(soak.tmp / name, out / name)
