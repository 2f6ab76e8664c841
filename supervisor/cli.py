"""The `dynamo-vllm` command.

Heavy modules (vLLM, torch, the worker) are imported inside the commands that need them,
so `dynamo-vllm config ...` answers at once and the supervisor stays light.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import tomli_w

from dynamo_vllm.agent import config as config_module
from dynamo_vllm.agent.protocol import ExitCode

CONFIG_DIR_ENV = "DYNAMO_VLLM_CONFIG_DIR"
DEFAULT_CONFIG_DIR = "/etc/dynamo-vllm"


def config_path_for(name_or_path: str) -> Path:
    """A path as given, or NAME as `$DYNAMO_VLLM_CONFIG_DIR/NAME.toml` (/etc/dynamo-vllm)."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or "/" in name_or_path or candidate.exists():
        return candidate
    return Path(os.environ.get(CONFIG_DIR_ENV, DEFAULT_CONFIG_DIR)) / f"{name_or_path}.toml"


def load_or_exit(target: str, check_paths: bool = True) -> config_module.Config:
    try:
        return config_module.load(config_path_for(target), check_paths=check_paths)
    except config_module.ConfigError as exc:
        for line in exc.errors:
            click.echo(f"config error: {line}", err=True)
        sys.exit(ExitCode.CONFIG)


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


@main.command("tiny-model")
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True)
def tiny_model(path: Path, dtype: str) -> None:
    """Build a tiny Llama (random weights, local tokenizer) in PATH, with no downloads.

    Deterministic: the same files on every build. Needs the engine installed (torch,
    transformers). Tests and `make demo` serve it.
    """
    from dynamo_vllm.agent.tiny_model import build

    out = build(path, dtype=dtype)
    click.echo(f"tiny model written to {out}")


@main.group()
def config() -> None:
    """Write, check and show instance configs."""


@config.command("init")
@click.argument("name")
@click.option("--model", required=True, metavar="PATH", help="Directory of the model to serve.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--port", default=8100, show_default=True, type=click.IntRange(1, 65535),
              help="Port of worker 0; worker i uses port + i.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here instead of standard output.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def config_init(name: str, model: str, workers: int, port: int, output: Path | None,
                force: bool) -> None:
    """Write a commented config for instance NAME that works on this machine.

    Without a GPU it chooses the CPU engine, eager mode and a KV cache that fits.
    """
    from dynamo_vllm.agent.config_init import render, write

    text = render(name, model, workers=workers, port=port)
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        write(output, text, force=force)
    except FileExistsError:
        raise click.ClickException(f"{output} exists; use --force to replace it") from None
    click.echo(f"wrote {output}", err=True)


@config.command("check")
@click.argument("target", metavar="FILE|NAME")
def config_check(target: str) -> None:
    """Validate a config; print every error with its key and exit 78 if there is one."""
    cfg = load_or_exit(target)
    for warning in cfg.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{cfg.source}: ok ({cfg.workers.count} worker(s) serving {cfg.served_name!r} "
               f"on ports {cfg.worker_port(0)}-{cfg.worker_port(cfg.workers.count - 1)})")


@config.command("show")
@click.argument("target", metavar="FILE|NAME")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of TOML.")
def config_show(target: str, as_json: bool) -> None:
    """Print the effective config: defaults filled in, environment overrides applied."""
    cfg = load_or_exit(target, check_paths=False)
    for warning in cfg.warnings:
        click.echo(f"warning: {warning}", err=True)
    data = cfg.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(tomli_w.dumps(data), nl=False)


if __name__ == "__main__":
    main()
