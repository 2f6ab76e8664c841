"""`dynamo-vllm doctor NAME`: the preflight an operator runs before the first start.

One line per check, `ok`, `warn` or `FAIL`, and a non-zero exit naming what fails. Checks
that depend on who runs the instance (the model readable, the engine importable, the
state directory writable) run as the service user when doctor runs as root and that user
exists, through the same `setpriv` drop the supervisor uses for its workers.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from dynamo_vllm.cli.common import config_path_for, local_host, request, supervisor_url
from dynamo_vllm.contract import config as config_module
from dynamo_vllm.supervisor.privilege import WorkerAccount

SERVICE_USER = "dynamo-vllm"
STATE_DIR = Path("/var/lib/dynamo-vllm")


@dataclass
class Check:
    name: str
    verdict: str  # ok | warn | FAIL
    detail: str


def _as_service(argv: list[str], user: str | None, timeout: float) -> subprocess.CompletedProcess:
    """Run `argv` as the service user (when doctor is root and it exists), dropped exactly
    as the supervisor drops its workers."""
    if user is not None:
        entry = pwd.getpwnam(user)
        argv = [*WorkerAccount(user, entry.pw_uid, entry.pw_gid).command_prefix(), *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def _service_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return None
    return SERVICE_USER


def _check_readable(path: str, user: str | None) -> str | None:
    out = _as_service(["test", "-r", path], user, 10)
    return None if out.returncode == 0 else f"{path} is not readable by {user or 'this user'}"


def _check_model(model: str, user: str | None) -> str | None:
    """Every file of the model, weights included, readable by the workers' account (a file
    saved 0600 and owned by another account is a start that fails late)."""
    problem = _check_readable(str(Path(model) / "config.json"), user)
    if problem:
        return problem
    out = _as_service(["find", model, "-maxdepth", "2", "!", "-readable", "-print", "-quit"],
                      user, 60)
    unreadable = out.stdout.strip()
    return f"{unreadable} is not readable by {user or 'this user'}" if unreadable else None


def run_checks(target: str) -> list[Check]:
    from dynamo_vllm.contract.engine_venv import engine_python

    checks: list[Check] = []
    add = lambda name, verdict, detail: checks.append(Check(name, verdict, detail))  # noqa: E731
    path = config_path_for(target)
    try:
        cfg = config_module.load(path)
    except config_module.ConfigError as exc:
        for line in exc.errors:
            add("config", "FAIL", line)
        return checks
    add("config", "ok", f"{path}" + (f" ({len(cfg.warnings)} warning(s))" if cfg.warnings
                                     else ""))
    for warning in cfg.warnings:
        add("config", "warn", warning)
    user = _service_user()
    who = user or f"uid {os.geteuid()}"
    problem = _check_model(cfg.model.path, user)
    add("model", "FAIL" if problem else "ok", problem or f"{cfg.model.path} readable by {who}")
    # The supervisor's own choice: workers.python, the engine venv, else its interpreter.
    python = cfg.workers.python or engine_python() or sys.executable
    _check_engine(add, python, user)
    _check_gpus(add, cfg)
    running = request(supervisor_url(cfg, "/status"), timeout=3)[0] == 200
    _check_ports(add, cfg, running)
    _check_dirs(add, cfg, user)
    _check_checkpoints(add, cfg)
    _check_etcd(add, cfg)
    _check_token(add, cfg, user)
    return checks


def _check_engine(add: Callable[[str, str, str], None], python: str, user: str | None) -> None:
    out = _as_service([python, "-c", "import vllm, torch; print(vllm.__version__)"], user, 300)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        add("engine", "FAIL", f"{python} cannot import vLLM: {last} (`dynamo-vllm engine "
                              "install --cpu|--cuda`, or workers.python)")
    else:
        add("engine", "ok", f"vLLM {out.stdout.strip()} at {python}")


def _check_gpus(add: Callable[[str, str, str], None], cfg: config_module.Config) -> None:
    from dynamo_vllm.supervisor.devices import detect_gpus

    per_worker = cfg.workers.gpus_per_worker
    if per_worker == 0:
        add("gpus", "ok", "the CPU engine (gpus_per_worker = 0)")
        return
    gpus = cfg.workers.gpus if cfg.workers.gpus is not None else detect_gpus()
    needed = per_worker * cfg.workers.count
    nodes = sorted(str(p) for p in Path("/dev").glob("nvidia[0-9]*"))
    if len(gpus) < needed:
        add("gpus", "FAIL", f"{needed} GPU(s) needed ({cfg.workers.count} x {per_worker}), "
                            f"{len(gpus)} found")
    elif not nodes:
        add("gpus", "FAIL", "no /dev/nvidia* device nodes (driver not loaded?)")
    else:
        add("gpus", "ok", f"{len(gpus)} GPU(s), {len(nodes)} /dev/nvidia* node(s)")
    parallel = int(cfg.engine.get("tensor_parallel_size", 1)) * \
        int(cfg.engine.get("pipeline_parallel_size", 1))
    if parallel != per_worker:
        add("gpus", "FAIL", f"tensor_parallel_size x pipeline_parallel_size is {parallel}, "
                            f"gpus_per_worker is {per_worker}")


def _check_ports(add: Callable[[str, str, str], None], cfg: config_module.Config,
                 running: bool) -> None:
    from dynamo_vllm.supervisor.startup import port_free

    if running:
        add("ports", "ok", "the instance runs: its ports are its own")
        return
    wanted = [(cfg.workers.host, cfg.worker_port(i), f"worker {i}")
              for i in range(cfg.workers.count)]
    wanted.append((cfg.metrics.host, cfg.metrics.port, "metrics.port"))
    if cfg.frontend.enabled:
        wanted.append((cfg.frontend.host, cfg.frontend.port, "frontend.port"))
    busy = [f"{local_host(host)}:{port} ({what})" for host, port, what in wanted
            if not port_free(host, port)]
    add("ports", "FAIL" if busy else "ok",
        f"in use: {', '.join(busy)}" if busy else f"{len(wanted)} port(s) free")


def _check_dirs(add: Callable[[str, str, str], None], cfg: config_module.Config,
                user: str | None) -> None:
    state = Path(os.environ.get("STATE_DIRECTORY", "") or STATE_DIR)
    if not state.is_dir():
        add("state", "warn", f"{state} does not exist (systemd makes it at start)")
        return
    out = _as_service(["test", "-w", str(state)], user, 10)
    add("state", "ok" if out.returncode == 0 else "FAIL",
        f"{state} {'is' if out.returncode == 0 else 'is not'} writable by "
        f"{user or 'this user'}")


def _check_checkpoints(add: Callable[[str, str, str], None],
                       cfg: config_module.Config) -> None:
    if not cfg.checkpoint.enabled:
        return
    from dynamo_vllm.supervisor.checkpoint.criu import CriuCheckpointer

    settings = cfg.checkpoint
    problem = CriuCheckpointer(settings.criu, settings.criu_libdir, settings.timeout).check()
    add("criu", "FAIL" if problem else "ok", problem or f"{settings.criu} can checkpoint here")


def _check_etcd(add: Callable[[str, str, str], None], cfg: config_module.Config) -> None:
    if cfg.discovery.backend != "etcd" and cfg.dynamo.discovery_backend != "etcd":
        return
    import asyncio

    from dynamo_vllm.contract.discovery.etcd_gateway import EtcdError, EtcdGateway

    async def probe() -> None:
        gateway = EtcdGateway.for_settings(cfg.discovery)
        try:
            await gateway.get_prefix(cfg.discovery.etcd_prefix)
        finally:
            await gateway.close()

    try:
        asyncio.run(asyncio.wait_for(probe(), 10))
        add("etcd", "ok", f"reachable at {', '.join(cfg.discovery.etcd_urls)}")
    except (EtcdError, TimeoutError, OSError) as exc:
        add("etcd", "FAIL", f"{', '.join(cfg.discovery.etcd_urls)}: {exc or 'timed out'}")


def _check_token(add: Callable[[str, str, str], None], cfg: config_module.Config,
                 user: str | None) -> None:
    path = cfg.workers.control_token_file
    if not path:
        add("credential", "ok", "a fresh control token is written at each start")
        return
    problem = _check_readable(path, user)
    add("credential", "FAIL" if problem else "ok", problem or f"{path} readable by the workers")


@click.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--json", "as_json", is_flag=True, help="The checks as JSON.")
def doctor(target: str, as_json: bool) -> None:
    """Check an instance before its first start: the config, the model readable and the
    engine importable by the service user, GPUs and /dev/nvidia* against gpus_per_worker
    (and TP x PP), ports free, the state directory writable, CRIU when checkpoints are on,
    etcd when used, the credential. One line per check; exit 1 naming what fails."""
    checks = run_checks(target)
    failed = [c for c in checks if c.verdict == "FAIL"]
    if as_json:
        click.echo(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        for c in checks:
            click.echo(f"{c.verdict:<4}  {c.name:<10}  {c.detail}")
    if failed:
        click.echo(f"{target}: {len(failed)} check(s) failed: "
                   f"{', '.join(sorted({c.name for c in failed}))}", err=True)
        sys.exit(1)
