"""What the commands share: finding an instance's config, and talking to its processes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from dynamo_vllm.contract import config as config_module
from dynamo_vllm.contract.protocol import ExitCode

CONFIG_DIR_ENV = "DYNAMO_VLLM_CONFIG_DIR"
DEFAULT_CONFIG_DIR = "/etc/dynamo-vllm"


def config_path_for(name_or_path: str) -> Path:
    """A path (it ends in .toml or has a /) as given; anything else is an instance NAME:
    `$DYNAMO_VLLM_CONFIG_DIR/NAME.toml` (/etc/dynamo-vllm). Never a file of that bare name in
    the working directory: under the unit (WorkingDirectory=/var/lib/dynamo-vllm) a model
    directory named like the instance would be read as its config."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or "/" in name_or_path:
        return candidate
    return Path(os.environ.get(CONFIG_DIR_ENV, DEFAULT_CONFIG_DIR)) / f"{name_or_path}.toml"


def load_or_exit(target: str, check_paths: bool = True) -> config_module.Config:
    try:
        return config_module.load(config_path_for(target), check_paths=check_paths)
    except config_module.ConfigError as exc:
        for line in exc.errors:
            click.echo(f"config error: {line}", err=True)
        sys.exit(ExitCode.CONFIG)


def instance_name(target: str) -> str:
    return Path(target).stem if target.endswith(".toml") or "/" in target else target


def request(url: str, body: dict | None = None, timeout: float = 60.0,
             token: str | None = None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    from dynamo_vllm.contract.gate import header_for

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json",
                                              **header_for(token)})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {"status": "error", "message": str(exc)}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return 0, {"status": "error", "message": f"no answer: {exc}"}


def local_host(host: str) -> str:
    """Where this machine reaches a server bound to `host`, as a URL's host: a wildcard is
    loopback (a socket bound to `::` takes IPv4 too), an IPv6 address goes in brackets."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def supervisor_url(cfg: config_module.Config, path: str) -> str:
    return f"http://{local_host(cfg.metrics.host)}:{cfg.metrics.port}{path}"


def supervisor_get(target: str, path: str, timeout: float) -> dict:
    """GET one of the running supervisor's read-only routes; exit 3 when none answers."""
    cfg = load_or_exit(target, check_paths=False)
    url = supervisor_url(cfg, path)
    code, data = request(url, timeout=timeout)
    if code != 200:
        click.echo(f"{target}: no supervisor answers at {url}: "
                   f"{data.get('message') or data.get('error') or data}", err=True)
        sys.exit(3)
    return data


def worker_urls(cfg: config_module.Config, worker: int | None) -> list[tuple[int, str]]:
    host = local_host(cfg.workers.host)
    return [(i, f"http://{host}:{cfg.worker_port(i)}") for i in worker_indices(cfg, worker)]


def token_path(cfg: config_module.Config) -> str | None:
    """The token file control needs: the config's, else the one the running supervisor
    wrote into its runtime directory (None: no supervisor runs, or a bare worker)."""
    from dynamo_vllm.supervisor.control_token import TOKEN_NAME
    from dynamo_vllm.supervisor.runtime_dir import runtime_dirs_to_search

    if cfg.workers.control_token_file:
        return cfg.workers.control_token_file
    for directory in runtime_dirs_to_search(Path(cfg.source).stem):
        candidate = directory / TOKEN_NAME
        try:
            candidate.lstat()
        except PermissionError:
            return str(candidate)  # there, not ours to read: load_token says so
        except OSError:
            continue
        return str(candidate)
    return None


def token_or_exit(cfg: config_module.Config) -> str | None:
    from dynamo_vllm.contract.gate import TokenError, load_token

    path = token_path(cfg)
    if path is None:
        return None
    try:
        return load_token(path)
    except TokenError as exc:
        click.echo(f"the control token: {exc} (run as root or the service user; "
                   "workers.control_token_file)", err=True)
        sys.exit(ExitCode.CONFIG)


def control_workers(target: str, worker: int | None, path: str, body: dict,
                    as_json: bool = False) -> None:
    cfg = load_or_exit(target, check_paths=False)
    token = token_or_exit(cfg)
    failed = False
    results = []
    for index, base in worker_urls(cfg, worker):
        code, answer = request(base + path, body, token=token)
        failed |= code != 200
        results.append({"worker": index, "code": code, **answer})
        if as_json:
            continue
        extra = {k: v for k, v in answer.items() if k not in ("status", "message")}
        click.echo(f"worker {index}: {answer.get('status', 'error')}: {answer.get('message')}"
                   + (f" {json.dumps(extra)}" if extra else ""))
    if as_json:
        echo_json(results)
    if failed:
        sys.exit(1)


def echo_json(results: list[dict]) -> None:
    """One JSON document per command: a list with one object per worker."""
    click.echo(json.dumps(results, indent=2))


def worker_indices(cfg: config_module.Config, worker: int | None) -> list[int]:
    if worker is None:
        return list(range(cfg.workers.count))
    if not 0 <= worker < cfg.workers.count:
        raise click.BadParameter(f"the instance has workers 0 to {cfg.workers.count - 1}",
                                 param_hint="--worker")
    return [worker]


def supervisor_post(cfg: config_module.Config, path: str, body: dict,
                     timeout: float) -> tuple[int, dict]:
    return request(supervisor_url(cfg, path), body, timeout,
                    token=token_or_exit(cfg))
