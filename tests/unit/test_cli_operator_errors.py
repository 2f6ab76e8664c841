"""Every command against the operator's usual mistakes: a stopped instance, a config that
cannot be read, a runtime directory that is not there. Each ends with a message and a
non-zero exit, never a traceback. (A permission error, as another user, is the container
tier's: tests/system/test_nspawn.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from dynamo_vllm.cli.main import main
from tests.harness import free_port

COMMANDS = [["status"], ["status", "--json"], ["endpoints"], ["sleep"], ["sleep", "--json"],
            ["wake"], ["wake", "--json"], ["checkpoint"], ["checkpoint", "--json"],
            ["checkpoints"], ["restore", "--timeout", "1"], ["restore", "--json"],
            ["reload", "--timeout", "1"], ["config", "show"], ["config", "check"]]


def stopped_instance(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    conf = tmp_path / "stopped.toml"
    conf.write_text(f'[model]\npath = "{tmp_path}"\n[workers]\nbase_port = {free_port()}\n'
                    f'[metrics]\nport = {free_port()}\n[checkpoint]\nenabled = true\n'
                    f'store = "{tmp_path}/store"\n')
    return conf


def run(args: list[str], target: str, env: dict[str, str] | None = None) -> Result:
    command, rest = (args[:2], args[2:]) if args[0] == "config" else (args[:1], args[1:])
    return CliRunner().invoke(main, [*command, target, *rest], env=env)


def no_traceback(result: Result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{type(result.exception).__name__}: {result.exception}\n{result.output}"
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_a_stopped_instance(tmp_path: Path, args: list[str]) -> None:
    result = run(args, str(stopped_instance(tmp_path)),
                 env={"DYNAMO_VLLM_RUNTIME_DIR": str(tmp_path / "no-such-runtime-dir")})
    no_traceback(result)
    if args[0] in ("config", "checkpoints"):
        assert result.exit_code == 0, result.output  # they need no running instance
    else:
        assert result.exit_code != 0, result.output
    if "--json" in args and args[0] != "status":
        answers = json.loads(result.stdout)
        assert answers and all(a["code"] != 200 for a in answers), answers


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_a_config_that_cannot_be_read(tmp_path: Path, args: list[str]) -> None:
    unreadable = tmp_path / "dir.toml"
    unreadable.mkdir()
    result = run(args, str(unreadable))
    no_traceback(result)
    assert result.exit_code == 78 and "cannot read" in result.output, result.output
