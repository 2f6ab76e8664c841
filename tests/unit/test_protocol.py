from __future__ import annotations

import ast
import subprocess
import sys

from dynamo_vllm.contract.protocol import ExitCode


def test_exit_codes_are_distinct_and_described() -> None:
    codes = [int(code) for code in ExitCode]
    assert len(codes) == len(set(codes))
    assert ExitCode.CONFIG == 78
    assert ExitCode.describe(3) == "engine dead"
    assert ExitCode.describe(-9) == "killed by SIGKILL"
    assert ExitCode.describe(1) == "crashed (exit status 1)"


def imported_after(modules: str, suspects: tuple[str, ...]) -> list[str]:
    code = (f"import sys, {modules}; print([m for m in {suspects!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    return list(ast.literal_eval(result.stdout))


def test_the_supervisor_never_imports_the_engine() -> None:
    supervisor = ("dynamo_vllm.cli.main, dynamo_vllm.supervisor.daemon, "
                  "dynamo_vllm.supervisor.metrics, dynamo_vllm.supervisor.http")
    assert imported_after(supervisor, ("vllm", "torch", "transformers")) == []


def test_the_cli_imports_no_metrics_library() -> None:
    # The worker command sets PROMETHEUS_MULTIPROC_DIR after the CLI module is imported;
    # prometheus_client must not be imported before that.
    assert imported_after("dynamo_vllm.cli.main, dynamo_vllm.contract.config",
                          ("vllm", "torch", "transformers", "prometheus_client")) == []
