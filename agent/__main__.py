"""Worker entry point: `python -m dynamo_vllm.agent --config FILE --index I`.

`dynamo-vllm worker` runs the same function. The environment is prepared before anything
imports prometheus_client or vLLM: prometheus_client chooses multiprocess mode at import.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NoReturn

from dynamo_vllm.agent.chrek_env import checkpoint_already_taken
from dynamo_vllm.agent.snapshot import (
    SnapshotConfigError,
    SnapshotSettings,
    set_capture_env,
    settings_from_env,
)
from dynamo_vllm.contract import logs
from dynamo_vllm.contract.config import Config, ConfigError, load
from dynamo_vllm.contract.protocol import Env, ExitCode

log = logging.getLogger("dynamo_vllm.worker")


def _die_with_supervisor() -> None:
    """Under a supervisor, get SIGTERM when it dies, so no worker outlives it.

    The worker then shuts its engine down as on any stop. Armed here rather than in a
    pre-exec hook, which is unsafe in a threaded parent.
    """
    supervisor = os.environ.get(Env.SUPERVISOR_PID)
    if not supervisor:
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if str(os.getppid()) != supervisor:  # it died before the signal was armed
        print("dynamo-vllm worker: the supervisor is gone; not starting", file=sys.stderr)
        _exit(ExitCode.STOPPED)


def _keep_to_own_cpus() -> None:
    """A CPU-engine worker given its own CPUs moves there before torch is imported.

    torch's import pins the process to each CPU it may use in turn (a CPU probe). With
    another worker's engine thread pinned busy on one of them, that move can wait for
    minutes (seen on 2 cores: a restarted worker silent until the other went idle, SIGKILL
    included). Kept to its own CPUs, the probe visits only those, and the agent, EngineCore
    and its threads stay off the other workers' cores.
    """
    given = os.environ.get(Env.WORKER_CPUS, "")
    try:
        cpus = {int(cpu) for cpu in given.split(",") if cpu.strip()}
    except ValueError:
        print(f"dynamo-vllm worker: ignoring {Env.WORKER_CPUS}={given!r}: not a list of CPU "
              f"numbers", file=sys.stderr)
        return
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:
            print(f"dynamo-vllm worker: cannot keep to CPUs {sorted(cpus)}: {exc}",
                  file=sys.stderr)


def _prepare_environment(index: int) -> str | None:
    """Engine env defaults and a metrics directory. Returns a directory to remove at exit."""
    _die_with_supervisor()
    _keep_to_own_cpus()
    for name, value in Env.ENGINE_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the metrics directory was set")
    given = os.environ.get(Env.PROMETHEUS_MULTIPROC_DIR)
    if given:
        # The supervisor creates it fresh for each worker life; recreate it if it vanished.
        os.makedirs(given, mode=0o700, exist_ok=True)
        return None
    own = tempfile.mkdtemp(prefix=f"dynamo-vllm-worker{index}-metrics-")
    os.environ[Env.PROMETHEUS_MULTIPROC_DIR] = own
    return own


def _config_error(lines: list[str]) -> int:
    for line in lines:
        print(f"dynamo-vllm worker: config error: {line}", file=sys.stderr)
    return ExitCode.CONFIG


def run(config_path: str, index: int = 0, debug: bool = False) -> NoReturn:
    """Run worker `index` of the config in the foreground and exit with its ExitCode."""
    try:
        config = load(config_path)
    except ConfigError as exc:
        _exit(_config_error(exc.errors))
    if not 0 <= index < config.workers.count:
        _exit(_config_error([f"--index {index}: the config has workers 0 to "
                             f"{config.workers.count - 1} (workers.count)"]))
    level = "debug" if debug else config.logging.level
    logs.setup(level, name=f"worker{index}", worker=str(index))
    for warning in config.warnings:
        log.warning("%s", warning)
    own_metrics_dir = _prepare_environment(index)
    # Before vLLM is imported: its logger, here and in EngineCore and its workers, is ours.
    logs.route_vllm_logging(Path(os.environ[Env.PROMETHEUS_MULTIPROC_DIR]), f"worker{index}",
                            str(index), level)
    try:
        snapshot = settings_from_env(os.environ, config.checkpoint.timeout,
                                     config.checkpoint.sleep_level, config.checkpoint.env_allow)
    except SnapshotConfigError as exc:
        _exit(_config_error(exc.errors))
    if snapshot and snapshot.env_protocol and checkpoint_already_taken(snapshot.env_protocol):
        log.info("worker %d: the checkpoint at %s is taken already (checkpoint.done); exiting",
                 index, snapshot.env_protocol.location)
        _exit(ExitCode.CHECKPOINTED)
    capture_env = set_capture_env(os.environ) if snapshot and snapshot.at_start else {}
    code: int
    try:
        code = _run_worker(config, index, debug, snapshot, capture_env)
    finally:
        if own_metrics_dir:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)
    _exit(code)


def _run_worker(config: Config, index: int, debug: bool, snapshot: SnapshotSettings | None,
                capture_env: dict[str, str | None]) -> int:
    # Imported only now: they import prometheus_client, and the metrics directory had to
    # be set first.
    from dynamo_vllm.agent.engine import EngineConfigError, EngineStartError, refused_engine_key
    from dynamo_vllm.agent.server import PortInUse
    from dynamo_vllm.agent.worker import Worker
    from dynamo_vllm.contract.gate import TokenError

    try:
        return int(_run_loop(Worker(config, index, snapshot, capture_env).run(),
                             checkpointable=snapshot is not None))
    except EngineConfigError as exc:
        return _config_error([f"{refused_engine_key(config, str(exc))}: vLLM refused the "
                              f"engine arguments: {exc}"])
    except PortInUse as exc:
        return _config_error([f"workers.base_port: {exc}"])
    except EngineStartError as exc:
        if exc.permanent:
            return _config_error([f"engine failed to start: {exc}"])
        log.error("worker %d: engine failed to start: %s (exit %d: the supervisor retries)",
                  index, exc, ExitCode.START_FAILED)
        return ExitCode.START_FAILED
    except TokenError as exc:
        return _config_error([f"workers.control_token_file: {exc}"])
    except Exception as exc:
        if debug:
            log.exception("worker %d failed", index)
        else:
            log.error("worker %d failed: %s: %s (run with --debug for the traceback)", index,
                      type(exc).__name__, exc)
        return 1


def _run_loop(main: Coroutine[Any, Any, int], checkpointable: bool) -> int:
    """Run the worker on uvloop, as vLLM's own server and Dynamo's `dynamo.vllm` do: on the
    standard loop the OpenAI request path cost measurably more time to first token. Not when
    the worker may be checkpointed: libuv maps an io_uring ring at every loop start (even with
    UV_USE_IO_URING=0), and CRIU cannot dump one."""
    if checkpointable:
        return asyncio.run(main)
    try:
        import uvloop
    except ImportError:  # not a dependency of every vLLM build
        return asyncio.run(main)
    return int(uvloop.run(main))


def _exit(code: int) -> NoReturn:
    # vLLM leaves non-daemon threads and noisy finalisers behind; the engine is already
    # shut down and its processes reaped, so leave without the interpreter's teardown.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="python -m dynamo_vllm.agent",
                                     description="Run one dynamo-vllm worker in the foreground.")
    parser.add_argument("--config", required=True, help="the instance's TOML config")
    parser.add_argument("--index", type=int, default=0, help="which worker of the config")
    parser.add_argument("--debug", action="store_true", help="debug logs and tracebacks")
    opts = parser.parse_args(argv)
    run(opts.config, opts.index, opts.debug)


if __name__ == "__main__":
    main()
