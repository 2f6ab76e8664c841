from __future__ import annotations

import subprocess
import sys

from dynamo_vllm.agent.protocol import ExitCode


def test_exit_codes_are_distinct_and_described() -> None:
    codes = [int(code) for code in ExitCode]
    assert len(codes) == len(set(codes))
    assert ExitCode.CONFIG == 78
    assert ExitCode.describe(3) == "engine dead"
    assert ExitCode.describe(-9) == "killed by SIGKILL"
    assert ExitCode.describe(1) == "crashed (exit status 1)"


def test_cli_and_config_never_import_the_engine() -> None:
    code = ("import sys, dynamo_vllm.supervisor.cli, dynamo_vllm.agent.config;"
            "heavy = [m for m in ('vllm', 'torch', 'transformers', 'prometheus_client')"
            " if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
