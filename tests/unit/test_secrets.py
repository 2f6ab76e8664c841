"""Secrets in the config and the environment: redacted where shown, counted by digest in a
checkpoint's identity (a rotation changes the hash; the stored document holds none)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from dynamo_vllm.cli.main import main
from dynamo_vllm.contract.config import from_dict
from dynamo_vllm.contract.secrets import is_secret_name
from dynamo_vllm.supervisor.checkpoint.identity import checkpoint_hash, identity

KEY = "sk-very-secret-0123456789"


def config(tmp_path: Path, api_key: str) -> object:
    (tmp_path / "config.json").write_text("{}")
    return from_dict({"model": {"path": str(tmp_path)}, "engine": {"api_key": api_key,
                                                                   "max_num_seqs": 4}},
                     check_paths=False)


def document(tmp_path: Path, api_key: str) -> dict:
    return identity(config(tmp_path, api_key), 0, 8100, [], [], "python", "0.32",  # type: ignore[arg-type]
                    "cpu:test")


def test_secret_names() -> None:
    for name in ("api_key", "api-key", "VLLM_API_KEY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY",
                 "ETCD_PASSWORD"):
        assert is_secret_name(name), name
    for name in ("control_token_file", "ssl_keyfile", "max_num_seqs", "tokenizer",
                 "DYN_HEALTH_CHECK_PAYLOAD", "monkey"):
        assert not is_secret_name(name), name


def test_a_rotated_api_key_changes_the_hash_and_is_never_stored(tmp_path: Path) -> None:
    first = document(tmp_path, KEY)
    assert KEY not in json.dumps(first)
    assert first["config"]["engine"]["max_num_seqs"] == 4
    assert checkpoint_hash(first) != checkpoint_hash(document(tmp_path, KEY + "-rotated"))
    assert checkpoint_hash(first) == checkpoint_hash(document(tmp_path, KEY))


def test_a_rotated_environment_secret_changes_the_hash(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    before = document(tmp_path, "x")
    assert KEY not in json.dumps(before) and "VLLM_API_KEY" in before["secrets"]
    monkeypatch.setenv("VLLM_API_KEY", KEY + "-rotated")
    assert checkpoint_hash(before) != checkpoint_hash(document(tmp_path, "x"))


def test_config_show_redacts_the_api_key(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    conf = tmp_path / "c.toml"
    conf.write_text(f'[model]\npath = "{tmp_path}"\n[engine]\napi_key = "{KEY}"\n')
    result = CliRunner().invoke(main, ["config", "show", str(conf)])
    assert result.exit_code == 0, result.output
    assert KEY not in result.output
    assert tomllib.loads(result.stdout)["engine"]["api_key"] == "<redacted>"


def test_a_key_in_a_world_readable_config_is_warned_about(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    conf = tmp_path / "c.toml"
    conf.write_text(f'[model]\npath = "{tmp_path}"\n[engine]\napi_key = "{KEY}"\n')
    conf.chmod(0o644)
    result = CliRunner().invoke(main, ["config", "check", str(conf)])
    assert result.exit_code == 0 and "engine.api_key: " in result.output, result.output
    assert "readable by others" in result.output
    conf.chmod(0o600)
    result = CliRunner().invoke(main, ["config", "check", str(conf)])
    assert "readable by others" not in result.output, result.output
