"""Dynamo's frontend as a supervised child of the unit ([frontend] enabled): one OpenAI port
for every worker of the node, with Dynamo's router and request migration.

`python -m dynamo.frontend` runs on the engine's interpreter (where ai-dynamo is installed),
in its own process group, with the discovery and planes of `[dynamo]`. The supervisor polls
its `/health` (the instances it sees) and `/v1/models`; it counts as serving once it lists
the model with at least `min_ready` of this node's workers behind it. A frontend that exits
or stops answering is restarted with the workers' backoff and crash-loop limit; one given up
stops the service. Stopping: the frontend goes first, so no request is admitted while the
workers drain. The supervisor imports nothing of Dynamo: it only starts the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from dynamo_vllm.contract.config import Config, engine_cli_args
from dynamo_vllm.contract.dynamo_env import runtime_environment
from dynamo_vllm.supervisor import http_client
from dynamo_vllm.supervisor.notify import SYSTEMD_ENV
from dynamo_vllm.supervisor.privilege import WorkerAccount
from dynamo_vllm.supervisor.restart_policy import RestartPolicy

log = logging.getLogger(__name__)


class FrontendState(enum.StrEnum):
    STARTING = "starting"
    WAITING = "waiting"
    """Up, but not yet listing the model with enough workers behind it."""
    SERVING = "serving"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPED = "stopped"


def frontend_args(config: Config) -> list[str]:
    """`python -m dynamo.frontend`'s arguments."""
    dynamo, frontend = config.dynamo, config.frontend
    return ["--discovery-backend", dynamo.discovery_backend,
            "--request-plane", dynamo.request_plane, "--event-plane", dynamo.event_plane,
            "--namespace", config.metrics.namespace,
            "--router-mode", frontend.router_mode,
            "--migration-limit", str(frontend.migration_limit),
            "--http-host", frontend.host, "--http-port", str(frontend.port),
            *engine_cli_args(frontend.args or {})]


def frontend_command(config: Config, python: str) -> list[str]:
    """The frontend under the journal relay (journal_relay.py), which files its Rust lines
    at their own priority under the unit."""
    python = python or sys.executable
    return [python, "-m", "dynamo_vllm.supervisor.journal_relay", "frontend", "--",
            python, "-m", "dynamo.frontend", *frontend_args(config)]


# Run on the engine's interpreter: Dynamo's own parser and checks, nothing started.
_CHECK_ARGS = """
import argparse, sys
from dynamo.frontend.frontend_args import FrontendArgGroup, FrontendConfig
parser = argparse.ArgumentParser(prog="dynamo.frontend")
FrontendArgGroup().add_arguments(parser)
args, unknown = parser.parse_known_args(sys.argv[1:])
if unknown:
    parser.error("unrecognized arguments: " + " ".join(unknown))
try:
    FrontendConfig.from_cli_args(args).validate()
except Exception as exc:
    parser.error(f"{type(exc).__name__}: {exc}")
"""


def frontend_args_problem(config: Config, python: str) -> str | None:
    """`key: problem` when Dynamo's frontend refuses the arguments it would be given (run
    before anything starts, and by `config check`); None when it takes them. Blocking."""
    command = [python or sys.executable, "-c", _CHECK_ARGS, *frontend_args(config)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"frontend.enabled: cannot run Dynamo's frontend parser ({exc})"
    if result.returncode == 0:
        return None
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    message = lines[-1] if lines else f"exit {result.returncode}"
    if "No module named 'dynamo" in result.stderr:
        return ("frontend.enabled: ai-dynamo is not installed for the engine's interpreter "
                f"({command[0]}); run `dynamo-vllm engine install`")
    for key in config.frontend.args or {}:
        if "--" + key.replace("_", "-") in message or key in message:
            return f"frontend.args.{key}: Dynamo's frontend refused it: {message}"
    return f"frontend: Dynamo's frontend refused its arguments: {message}"


def frontend_environment(config: Config, base: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in SYSTEMD_ENV}
    env.update(runtime_environment(config.dynamo, config.discovery))
    # Where workers stream their responses back to: the same address the planes use.
    env["DYN_TCP_RESPONSE_STREAM_HOST"] = config.dynamo.host
    return env


def workers_listed(health: Any, config: Config) -> int:
    """How many `generate` instances of this namespace the frontend's /health shows."""
    instances = health.get("instances", []) if isinstance(health, dict) else []
    return sum(1 for i in instances if isinstance(i, dict)
               and i.get("endpoint") == config.metrics.endpoint
               and i.get("namespace") == config.metrics.namespace)


class Service(Protocol):
    config: Config
    # The frontend runs with this until the unit restarts, through its own restarts too: a
    # reload names what it changed of it (restart_only.py) instead of applying half of it.
    started_config: Config

    @property
    def stopping(self) -> bool: ...

    async def pause(self, seconds: float) -> None: ...


@dataclass
class FrontendChild:
    python: str
    policy: RestartPolicy
    state: FrontendState = FrontendState.STOPPED
    state_since: float = 0.0
    reason: str = ""
    proc: asyncio.subprocess.Process | None = None
    lives: int = 0
    workers: int = 0
    poll_failures: int = 0
    last_exit: str = ""
    # The workers' account and environment, when the supervisor runs as root.
    account: WorkerAccount | None = None
    account_env: dict[str, str] = field(default_factory=dict)

    @property
    def serving(self) -> bool:
        return self.state is FrontendState.SERVING

    @property
    def failed(self) -> bool:
        return self.state is FrontendState.FAILED

    def _set(self, state: FrontendState, reason: str) -> None:
        if state is not self.state:
            log.info("frontend %s -> %s: %s", self.state.value, state.value, reason)
            self.state, self.state_since = state, time.monotonic()
        self.reason = reason

    def describe(self, now: float) -> dict[str, Any]:
        return {"state": self.state.value, "reason": self.reason,
                "for_s": round(now - self.state_since, 1),
                "pid": self.proc.pid if self.proc and self.proc.returncode is None else None,
                "workers_listed": self.workers, "restarts": max(0, self.lives - 1),
                "last_exit": self.last_exit}

    async def run(self, service: Service) -> None:
        """Start, watch and restart the frontend until the service stops or gives it up."""
        while not service.stopping:
            await self._spawn(service.started_config)
            await self._watch(service)
            if service.stopping:
                return
            self.policy.record_failure()
            if self.policy.crash_looping:
                self._set(FrontendState.FAILED, f"given up after {self.policy.recent_failures} "
                                                f"failures ({self.last_exit})")
                return
            delay = self.policy.next_delay()
            self._set(FrontendState.BACKOFF, f"{self.last_exit}; restarting in {delay:.1f} s")
            await service.pause(delay)

    async def _spawn(self, config: Config) -> None:
        # It faces clients: under a root supervisor it runs as the workers' account.
        drop = self.account.command_prefix() if self.account is not None else []
        self.proc = await asyncio.create_subprocess_exec(
            *drop, *frontend_command(config, self.python),
            env={**frontend_environment(config, dict(os.environ)), **self.account_env},
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
        self.lives += 1
        self.poll_failures = 0
        self.workers = 0
        self._set(FrontendState.STARTING, f"started (pid {self.proc.pid}, port "
                                          f"{config.frontend.port})")

    async def _watch(self, service: Service) -> None:
        assert self.proc is not None
        health = service.config.health
        while self.proc.returncode is None and not service.stopping:
            exited = asyncio.ensure_future(self.proc.wait())
            done, _ = await asyncio.wait({exited}, timeout=health.poll_interval)
            if not done:
                exited.cancel()
                await self._poll(service)
        if self.proc.returncode is not None and not service.stopping:
            self.last_exit = f"exited with {self.proc.returncode}"
            log.error("frontend (pid %d) %s", self.proc.pid, self.last_exit)

    async def _poll(self, service: Service) -> None:
        # Where it listens and what it watches as it started; what READY needs as of now.
        config, limits, current = service.started_config, service.config.health, service.config
        try:
            _, health = await http_client.get_json(config.frontend.host, config.frontend.port,
                                                   "/health", limits.poll_timeout)
            _, models = await http_client.get_json(config.frontend.host, config.frontend.port,
                                                   "/v1/models", limits.poll_timeout)
        except (http_client.PollError, OSError, TimeoutError) as exc:
            self.poll_failures += 1
            if self.state is not FrontendState.STARTING and \
                    self.poll_failures >= limits.poll_failures:
                self.last_exit = f"no answer to {self.poll_failures} polls ({exc})"
                log.error("frontend: %s; killing it", self.last_exit)
                self.kill()
            return
        self.poll_failures = 0
        self.workers = workers_listed(health, config)
        names = [m.get("id") for m in (models or {}).get("data", []) if isinstance(m, dict)]
        if current.served_name in names and self.workers >= current.min_ready:
            if not self.serving:
                self.policy.record_success()
            self._set(FrontendState.SERVING, f"serving {current.served_name} on port "
                                             f"{config.frontend.port}, {self.workers} worker(s)")
        else:
            self._set(FrontendState.WAITING, f"{self.workers} worker(s) listed, "
                                             f"{current.min_ready} needed")

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def stop(self, timeout: float) -> None:
        """SIGTERM (the frontend stops admitting and finishes what it streams), then kill."""
        if self.proc is None or self.proc.returncode is not None:
            self._set(FrontendState.STOPPED, "stopped")
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            log.warning("frontend did not stop within %.0f s; killing it", timeout)
            self.kill()
            await self.proc.wait()
        self._set(FrontendState.STOPPED, "stopped")
