from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynamo_vllm.contract import config as cfg
from dynamo_vllm.contract.protocol import Env


def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def minimal(tmp_path: Path) -> dict:
    return {"model": {"path": str(model_dir(tmp_path))}}


def errors_of(raw: dict) -> list[str]:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.from_dict(raw)
    return info.value.errors


def test_defaults_fill_in(tmp_path: Path) -> None:
    config = cfg.from_dict(minimal(tmp_path))
    assert config.workers.count == 1 and config.workers.host == "127.0.0.1"
    assert config.health.interval == 2.0 and config.health.check_timeout == 30.0
    assert config.health.shutdown_timeout == 60.0 and config.health.canary_idle == 5.0
    assert config.served_name == tmp_path.name
    assert config.min_ready == 1


def test_every_error_is_reported_with_its_key(tmp_path: Path) -> None:
    raw = minimal(tmp_path)
    raw["workers"] = {"cout": 2, "base_port": 70000, "count": True}
    raw["health"] = {"interval": "fast", "canary_failures": 0}
    raw["metrics"] = {"labels": {"le": "x"}}
    raw["engnie"] = {}
    errors = errors_of(raw)
    assert "workers.cout: unknown key (did you mean 'count'?)" in errors
    assert any(e.startswith("workers.base_port: must be a TCP port") for e in errors)
    assert any(e.startswith("workers.count: must be an integer") for e in errors)
    assert any(e.startswith("health.interval: must be a number") for e in errors)
    assert any(e.startswith("health.canary_failures: must be > 0") for e in errors)
    assert any(e.startswith("metrics.labels: 'le' is reserved") for e in errors)
    assert "engnie: unknown key (did you mean 'engine'?)" in errors
    assert len(errors) == 7


def test_model_path_checks(tmp_path: Path) -> None:
    assert errors_of({}) == ["model.path: required (the directory of the model to serve)"]
    assert "is not a directory" in errors_of({"model": {"path": str(tmp_path / "x")}})[0]
    assert "has no config.json" in errors_of({"model": {"path": str(tmp_path)}})[0]


def test_cross_field_checks(tmp_path: Path) -> None:
    raw = minimal(tmp_path)
    raw["workers"] = {"count": 2, "min_ready": 3, "base_port": 65535}
    errors = errors_of(raw)
    assert any(e.startswith("workers.min_ready: 3 is more than") for e in errors)
    assert any(e.startswith("workers.base_port: workers up to 1 would need port 65536")
               for e in errors)


def test_engine_keys_owned_by_agent_are_refused(tmp_path: Path) -> None:
    raw = minimal(tmp_path)
    raw["engine"] = {"port": 1, "served-model-name": "x", "Bad Key": 1, "max_model_len": 512}
    errors = errors_of(raw)
    assert "engine.port: set by the agent; use workers.base_port" in errors
    assert "engine.served-model-name: set by the agent; use model.served_name" in errors
    assert any(e.startswith("engine.Bad Key: not a vLLM argument name") for e in errors)


def test_tls_arguments_are_refused_not_dropped(tmp_path: Path) -> None:
    raw = minimal(tmp_path)
    raw["engine"] = {"ssl_certfile": "/etc/cert.pem", "ssl-keyfile": "/etc/key.pem"}
    errors = errors_of(raw)
    assert len(errors) == 2, errors
    assert all("not supported: the worker serves plain HTTP" in e for e in errors), errors


def test_engine_cli_args() -> None:
    args = cfg.engine_cli_args({"enforce_eager": True, "enable_prefix_caching": False,
                                "max_model_len": 512, "override_generation_config": {"a": 1},
                                "allowed_origins": ["x", "y"]})
    assert args == ["--enforce-eager", "--no-enable-prefix-caching", "--max-model-len", "512",
                    "--override-generation-config", '{"a": 1}', "--allowed-origins", "x", "y"]


def test_env_overrides_apply_and_invalid_ones_warn(tmp_path: Path) -> None:
    config = cfg.from_dict(minimal(tmp_path))
    env = {Env.HEALTH_CHECK_INTERVAL: "0.5", Env.HEALTH_CHECK_TIMEOUT: "soon",
           Env.HEALTH_SHUTDOWN_TIMEOUT: "-3", Env.CANARY_WAIT_TIME: "nan"}
    applied = cfg.apply_env(config, env)
    assert applied.health.interval == 0.5
    assert applied.health.check_timeout == 30.0
    assert applied.health.shutdown_timeout == 0.0
    assert applied.health.canary_idle == 5.0
    assert any("DYN_ENGINE_HEALTH_CHECK_TIMEOUT='soon' is not a number" in w
               for w in applied.warnings)
    assert any("is negative; using 0" in w for w in applied.warnings)
    assert any("is not finite" in w for w in applied.warnings)


def test_zero_disables_health_checks_but_not_the_canary(tmp_path: Path) -> None:
    config = cfg.from_dict(minimal(tmp_path))
    applied = cfg.apply_env(config, {Env.HEALTH_CHECK_INTERVAL: "0", Env.CANARY_WAIT_TIME: "0"})
    assert applied.health.interval == 0.0
    assert applied.health.canary_idle == 5.0


def test_payload_from_env_inline_and_file(tmp_path: Path) -> None:
    config = cfg.from_dict(minimal(tmp_path))
    inline = cfg.apply_env(config, {Env.HEALTH_CHECK_PAYLOAD: '{"prompt": "ping"}'})
    assert inline.health_payload.prompt == "ping"
    payload_file = tmp_path / "payload.json"
    payload_file.write_text(json.dumps({"token_ids": [5], "stop_conditions": {"max_tokens": 2}}))
    from_file = cfg.apply_env(config, {Env.HEALTH_CHECK_PAYLOAD: f"@{payload_file}"})
    assert from_file.health_payload.token_ids == (5,)
    assert from_file.health_payload.max_tokens == 2
    broken = cfg.apply_env(config, {Env.HEALTH_CHECK_PAYLOAD: "{not json"})
    assert broken.health_payload.token_ids is None and broken.health_payload.prompt is None
    assert any("not valid JSON" in w for w in broken.warnings)


def test_load_reports_toml_syntax_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\npath = 1\n")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(bad, environ={})
    assert "not valid TOML" in info.value.errors[0]
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(tmp_path / "missing.toml", environ={})
    assert "no such config file" in info.value.errors[0]


def test_to_dict_round_trips(tmp_path: Path) -> None:
    config = cfg.from_dict({**minimal(tmp_path), "engine": {"max_model_len": 512}})
    again = cfg.from_dict(config.to_dict())
    assert again == config


def test_discovery_and_lora_settings(tmp_path: Path) -> None:
    raw = minimal(tmp_path)
    raw["discovery"] = {"backend": "zookeeper", "etcd_endpoints": ["127.0.0.1:2379"],
                        "lease_ttl": 1}
    raw["lora"] = {"allowed_roots": ["loras"]}
    errors = errors_of(raw)
    assert any(e.startswith('discovery.backend: must be "file", "etcd" or "none"')
               for e in errors)
    assert any(e.startswith("discovery.etcd_endpoints: '127.0.0.1:2379' is not an http(s)")
               for e in errors)
    assert any(e.startswith("discovery.lease_ttl: must be from 3 to 3600") for e in errors)
    assert any(e.startswith("lora.allowed_roots: 'loras' is not an absolute path")
               for e in errors)
    raw["lora"] = {"allowed_roots": ["/srv/lora", "/"]}
    assert any(e.startswith("lora.allowed_roots: '/' is a system directory")
               for e in errors_of(raw)), errors_of(raw)
    raw["discovery"] = {"backend": "etcd"}
    raw["lora"] = {"allowed_roots": ["/srv/lora"]}
    config = cfg.from_dict(raw)
    assert config.discovery.etcd_urls == ["http://127.0.0.1:2379"]
    assert config.lora.allowed_roots == ["/srv/lora"]


def test_etcd_endpoints_from_env(tmp_path: Path) -> None:
    config = cfg.from_dict(minimal(tmp_path))
    applied = cfg.apply_env(config, {Env.ETCD_ENDPOINTS: "http://a:2379, http://b:2379"})
    assert applied.discovery.etcd_urls == ["http://a:2379", "http://b:2379"]
    kept = cfg.apply_env(config, {Env.ETCD_ENDPOINTS: "a:2379"})
    assert kept.discovery.etcd_urls == ["http://127.0.0.1:2379"]
    assert any("ETCD_ENDPOINTS='a:2379'" in w for w in kept.warnings)


def test_checkpoint_settings_are_checked() -> None:
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.from_dict({"model": {"path": "/m"}, "checkpoint": {
            "keep": 0, "store": "relative/dir", "sleep_level": 3, "env_allow": ["NOT A NAME"],
            "timeout": -1, "enabled": "yes"}}, check_paths=False)
    errors = "\n".join(caught.value.errors)
    for key in ("checkpoint.keep", "checkpoint.store", "checkpoint.sleep_level",
                "checkpoint.env_allow", "checkpoint.timeout", "checkpoint.enabled"):
        assert key in errors, errors
