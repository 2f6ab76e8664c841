"""`dynamo-vllm bench`: streaming load against an instance's workers (dynamo_vllm.bench)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dynamo_vllm.cli.common import load_or_exit, local_host, request, supervisor_url


def _bench_targets(target: str | None, urls: tuple[str, ...]) -> tuple[list[str], str | None]:
    """Base URLs to load and the instance's model name: --url, or every serving worker."""
    if urls:
        return [u.rstrip("/") for u in urls], None
    if not target:
        raise click.UsageError("give an instance NAME (every serving worker) or --url")
    cfg = load_or_exit(target, check_paths=False)
    host = local_host(cfg.workers.host)
    code, status = request(supervisor_url(cfg, "/status"), timeout=5)
    if code == 200:
        ports = [int(w["port"]) for w in status.get("workers", []) if w.get("state") == "serving"]
        if not ports:
            click.echo(f"{target}: no worker is serving ({status.get('status')})", err=True)
            sys.exit(3)
    else:
        ports = [cfg.worker_port(i) for i in range(cfg.workers.count)]
    return [f"http://{host}:{port}" for port in ports], cfg.served_name


def _served_model(url: str) -> str:
    code, answer = request(url + "/v1/models", timeout=10)
    models = answer.get("data") or []
    if code != 200 or not models:
        click.echo(f"{url}: cannot list models (HTTP {code}): give --model", err=True)
        sys.exit(3)
    return str(models[0]["id"])


@click.command()
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

    from dynamo_vllm.bench import report as bench_report
    from dynamo_vllm.bench.loadgen import Lengths, LengthSpecError, LoadSpec, run

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
