"""The supervisor's routes fuzzed from the OpenAPI document it publishes (schemathesis):
GET /metrics, /status, /healthz, /endpoints, /sd and POST /checkpoint, /restore, with
generated queries and bodies, valid and not. Every answer is a documented code, never a
5xx, and none hangs; the supervisor still answers after. Scripted workers stand in for the
engine (these are the supervisor's parsers and guards); checkpoints are on, with real CRIU.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import SupervisorProcess, free_port, fuzz_openapi, wait_for, write_config
from tests.integration.test_supervisor_scripted import fake_python, scripted_config


@pytest.fixture(scope="module")
def supervisor(tmp_path_factory: pytest.TempPathFactory, criu: Path) -> Iterator[SupervisorProcess]:
    tmp = tmp_path_factory.mktemp("http-fuzz")
    port = free_port()
    # A worker that starts and never serves: checkpoint and restore requests meet a worker
    # in every state the parsers must handle without a checkpoint being possible.
    # (`-c`: the supervisor asks the workers' interpreter for vLLM's version: none here.)
    path = scripted_config(tmp, fake_python(tmp, 'case "$1" in -c) exit 0;; esac\n'
                                                 "exec sleep 600"), port)
    config = tomllib.loads(path.read_text())
    config["checkpoint"] = {"enabled": True, "store": str(tmp / "store"), "criu": str(criu),
                            "timeout": 5.0}
    (tmp / "store").mkdir(mode=0o700)
    handle = SupervisorProcess(write_config(path, config), tmp, port)
    wait_for(handle.status, 60, what="the supervisor answering /status")
    yield handle
    handle.cleanup()


def test_routes_fuzzed_by_their_schema(supervisor: SupervisorProcess) -> None:
    failures = fuzz_openapi(supervisor.base + "/openapi.json", max_examples=25,
                            headers=supervisor.auth())
    assert not failures, "\n".join(failures)


def test_still_answers_after_the_fuzz(supervisor: SupervisorProcess) -> None:
    assert supervisor.proc.poll() is None, supervisor.log()
    assert httpx.get(supervisor.base + "/status", timeout=5).status_code == 200
    assert "Traceback" not in supervisor.log()
