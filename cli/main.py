"""The `dynamo-vllm` command: the front door of both processes and the operator's tools.

Heavy modules (vLLM, torch, the worker) are imported inside the commands that need them,
and the operator's commands' modules only when one of them runs (or help lists them), so
`dynamo-vllm config ...` answers at once and the supervisor, which lives as long as the
unit, carries none of them.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import click

from dynamo_vllm.cli.common import config_path_for, instance_name, load_or_exit
from dynamo_vllm.contract.protocol import ExitCode

# Command name: "module:function" under dynamo_vllm.cli.
LAZY_COMMANDS = {
    "doctor": "doctor:doctor",
    "status": "control:status", "sleep": "control:sleep", "wake": "control:wake",
    "endpoints": "control:endpoints", "checkpoint": "control:checkpoint",
    "checkpoints": "control:checkpoints", "restore": "control:restore",
    "reload": "control:reload",
    "bench": "bench:bench",
    "tiny-model": "tools:tiny_model", "engine": "tools:engine", "config": "tools:config",
}


class LazyCommands(click.Group):
    """click's lazily loading group (its documentation's "Lazily Loading Subcommands")."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in LAZY_COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, function = LAZY_COMMANDS[cmd_name].split(":")
        command = getattr(importlib.import_module(f"dynamo_vllm.cli.{module}"), function)
        assert isinstance(command, click.Command), LAZY_COMMANDS[cmd_name]
        return command


@click.group(cls=LazyCommands, context_settings={"help_option_names": ["-h", "--help"]})
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


if __name__ == "__main__":
    # `python -m dynamo_vllm.cli.main` is the command too: its help, man page and shell
    # completion (_DYNAMO_VLLM_COMPLETE) name it as installed.
    main(prog_name="dynamo-vllm")
