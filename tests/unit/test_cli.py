from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dynamo_vllm.cli.main import LAZY_COMMANDS, main
from dynamo_vllm.contract.settings import SECTIONS


def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tiny"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def test_config_init_writes_a_file_that_checks(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "tiny.toml"
    result = runner.invoke(main, ["config", "init", "tiny", "--model", str(model_dir(tmp_path)),
                                  "--workers", "2", "--port", "9100", "--output", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.count("\n# ") > 20  # commented
    raw = tomllib.loads(text)
    assert raw["workers"]["count"] == 2 and raw["workers"]["base_port"] == 9100
    assert raw["engine"]["kv_cache_memory_bytes"] >= 64 * 2**20
    check = runner.invoke(main, ["config", "check", str(out)])
    assert check.exit_code == 0, check.output
    assert "ok (2 worker(s)" in check.output
    again = runner.invoke(main, ["config", "init", "tiny", "--model", "x", "--output", str(out)])
    assert again.exit_code != 0 and "exists" in again.output
    # Every key appears, set or as a commented default, empty lists and tables included; a
    # commented key, uncommented, is valid TOML of the right shape.
    section = ""
    present: set[str] = set()
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif " = " in line:
            key = line.removeprefix("# ").split(" = ")[0]
            if key.isidentifier():
                present.add(f"{section}.{key}")
    for name, cls in SECTIONS.items():
        for key in cls.__dataclass_fields__:
            assert f"{name}.{key}" in present, f"{name}.{key}"
    assert "# labels = {}" in text and "# etcd_endpoints = []" in text


def test_config_init_dynamo_turns_the_runtime_on(tmp_path: Path) -> None:
    runner = CliRunner()
    model = model_dir(tmp_path)
    result = runner.invoke(main, ["config", "init", "tiny", "--model", str(model), "--dynamo",
                                  "--dynamo-kv", str(tmp_path / "kv")])
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.output)["dynamo"] == {"enabled": True,
                                                      "file_kv": str(tmp_path / "kv")}
    plain = runner.invoke(main, ["config", "init", "tiny", "--model", str(model)])
    assert tomllib.loads(plain.output)["dynamo"] == {}  # off unless asked for
    lone = runner.invoke(main, ["config", "init", "tiny", "--model", str(model),
                                "--dynamo-kv", "/x"])
    assert lone.exit_code == 2 and "--dynamo-kv goes with --dynamo" in lone.output


def test_config_check_exits_with_the_config_code(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[workers]\ncount = "two"\n')
    result = CliRunner().invoke(main, ["config", "check", str(bad)])
    assert result.exit_code == 78
    assert "config error: workers.count: must be an integer" in result.output
    assert "config error: model.path: required" in result.output


def test_config_show_applies_env(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f'[model]\npath = "{model_dir(tmp_path)}"\n')
    result = CliRunner().invoke(main, ["config", "show", str(conf)],
                                env={"DYN_ENGINE_HEALTH_CHECK_INTERVAL": "7"})
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.output)["health"]["interval"] == 7.0


def test_config_name_resolves_under_config_dir(tmp_path: Path) -> None:
    (tmp_path / "llama.toml").write_text(f'[model]\npath = "{model_dir(tmp_path)}"\n')
    result = CliRunner().invoke(main, ["config", "check", "llama"],
                                env={"DYNAMO_VLLM_CONFIG_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output


def test_a_bare_name_is_an_instance_even_beside_a_file_of_that_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The unit's working directory holds a model directory named like the instance.
    configs = tmp_path / "etc"
    configs.mkdir()
    (configs / "llama.toml").write_text(f'[model]\npath = "{model_dir(tmp_path)}"\n')
    (tmp_path / "llama").mkdir()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["config", "check", "llama"],
                                env={"DYNAMO_VLLM_CONFIG_DIR": str(configs)})
    assert result.exit_code == 0, result.output


def test_urls_from_ipv6_and_wildcard_hosts() -> None:
    from dynamo_vllm.cli.common import local_host

    assert local_host("::") == "127.0.0.1" and local_host("0.0.0.0") == "127.0.0.1"
    assert local_host("::1") == "[::1]" and local_host("fd00::5") == "[fd00::5]"
    assert local_host("10.0.0.2") == "10.0.0.2" and local_host("gpu01") == "gpu01"


def test_every_lazy_command_loads_under_its_name() -> None:
    """The operator's commands load on demand: each name finds its command, under that very
    name, and nothing of them is imported until one runs (the supervisor never does)."""
    for name in LAZY_COMMANDS:
        command = main.get_command(click.Context(main), name)
        assert command is not None and command.name == name, (name, command)
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, dynamo_vllm.cli.main; print(' '.join(m for m in "
         "sys.modules if m.startswith('dynamo_vllm.cli.')))"],
        capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert sorted(loaded) == ["dynamo_vllm.cli.common", "dynamo_vllm.cli.main"]
