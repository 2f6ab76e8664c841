"""The `dynamo-vllm` command: the front door of both processes and the operator's tools.

Heavy modules (vLLM, torch, the worker) are imported inside the commands that need them,
so `dynamo-vllm config ...` answers at once and the supervisor stays light.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from dynamo_vllm.cli import bench, control, doctor, tools
from dynamo_vllm.cli.common import config_path_for, instance_name, load_or_exit
from dynamo_vllm.contract.protocol import ExitCode


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dynamo-vllm")
def main() -> None:
    """dynamo-vllm: run vLLM workers under systemd, watch their health, export metrics.

    Exit codes are documented in the README ("Exit codes"); a config error exits with 78.
    """


@main.command()
@click.option("--config", "config_file", required=True, metavar="FILE",
              help="The instance config (TOML), or an instance NAME under /etc/dynamo-vllm.")
@click.option("--index", default=0, show_default=True, type=click.IntRange(min=0),
              help="Which worker of the config to run (its port is base_port + index).")
@click.option("--debug", is_flag=True, help="Debug logging, and tracebacks on errors.")
def worker(config_file: str, index: int, debug: bool) -> None:
    """Run one worker in the foreground: a vLLM engine behind the OpenAI API.

    It answers GET /health (loading, serving, draining, unhealthy, dead), checks the
    engine every health.interval seconds and sends a canary request when the engine has
    been idle, and exits with a documented code when the engine dies or hangs.
    """
    from dynamo_vllm.agent.__main__ import run

    run(str(config_path_for(config_file)), index, debug)


@main.command()
@click.argument("name", required=False)
@click.option("--config", "config_file", metavar="FILE",
              help="Config file (instead of NAME, which reads /etc/dynamo-vllm/NAME.toml).")
@click.option("--runtime-dir", type=click.Path(file_okay=False, path_type=Path),
              envvar="DYNAMO_VLLM_RUNTIME_DIR",
              help="Private directory for metric files, the effective config and the "
                   "control token (default: $RUNTIME_DIRECTORY, set by systemd; env "
                   "DYNAMO_VLLM_RUNTIME_DIR, which the control commands read too).")
@click.option("--debug", is_flag=True, help="Debug logging.")
def run(name: str | None, config_file: str | None, runtime_dir: Path | None,
        debug: bool) -> None:
    """Run the supervisor in the foreground: the systemd unit's ExecStart.

    Spawns the configured workers, restarts what dies or hangs, speaks sd_notify (READY,
    STATUS, WATCHDOG, EXTEND_TIMEOUT_USEC, RELOADING on SIGHUP, STOPPING) and serves
    /metrics, /status and /healthz on metrics.host:metrics.port. SIGTERM stops gracefully.
    """
    import asyncio

    from dynamo_vllm.contract import logs
    from dynamo_vllm.contract.protocol import Env

    target = config_file or name
    if not target:
        raise click.UsageError("give an instance NAME or --config FILE")
    # prometheus_client picks multiprocess mode at import: the supervisor's own metrics
    # must stay in memory, whatever the environment says.
    os.environ.pop(Env.PROMETHEUS_MULTIPROC_DIR, None)
    path = config_path_for(target)
    cfg = load_or_exit(target)
    instance = instance_name(target)
    logs.setup("debug" if debug else cfg.logging.level, name=f"dynamo-vllm@{instance}")
    from dynamo_vllm.supervisor.daemon import StartupError, Supervisor
    from dynamo_vllm.supervisor.runtime_dir import RuntimeDirError, private_runtime_dir

    try:
        runtime = private_runtime_dir(instance, runtime_dir)
        code = asyncio.run(Supervisor(cfg, runtime, path, instance=instance).run())
    except (StartupError, RuntimeDirError) as exc:
        click.echo(f"config error: {exc}", err=True)
        sys.exit(ExitCode.CONFIG)
    sys.exit(int(code))


for _command in (doctor.doctor, control.status, control.sleep, control.wake, control.endpoints,
                 control.checkpoint, control.checkpoints, control.restore, control.reload,
                 bench.bench,
                 tools.tiny_model, tools.engine, tools.config):
    main.add_command(_command)


if __name__ == "__main__":
    # `python -m dynamo_vllm.cli.main` is the command too: its help, man page and shell
    # completion (_DYNAMO_VLLM_COMPLETE) name it as installed.
    main(prog_name="dynamo-vllm")
