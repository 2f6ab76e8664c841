"""Each setting says which process reads it; the worker's view of a config (what a reload
rolls the workers for, what the checkpoint hash covers) is derived from that."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from dynamo_vllm.contract.config import SECTIONS, Scope, from_dict, scope_of, worker_view
from dynamo_vllm.supervisor.checkpoint.identity import checkpoint_hash, identity


def config(tmp_path: Path, **sections: dict[str, object]) -> object:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return from_dict({"model": {"path": str(model)}, **sections}, check_paths=False)


def test_every_setting_has_a_scope() -> None:
    for cls in SECTIONS.values():
        for f in fields(cls):
            assert isinstance(f.metadata.get("scope"), Scope), f"{cls.__name__}.{f.name}"


def test_the_worker_view_holds_exactly_the_worker_settings(tmp_path: Path) -> None:
    view = worker_view(config(tmp_path, engine={"max_model_len": 256}))  # type: ignore[arg-type]
    assert view["engine"] == {"max_model_len": 256}
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            inside = f.name in view.get(name, {})
            worker = scope_of(cls, f.name) is Scope.WORKER
            # Settings whose default is None are left out of to_dict, so of the view too.
            assert inside == worker or (worker and f.default is None), f"{name}.{f.name}"
    assert "watchdog" not in view and "logging" not in view
    assert "poll_interval" not in view["health"] and "interval" in view["health"]


@pytest.mark.parametrize(("section", "key", "value", "rolls"), [
    ("workers", "restart_backoff", 5.0, False),
    ("health", "poll_timeout", 9.0, False),
    ("metrics", "port", 9500, False),
    ("checkpoint", "keep", 5, False),
    ("logging", "level", "debug", False),
    ("health", "canary_idle", 7.0, True),
    ("checkpoint", "sleep_level", 2, True),
    ("workers", "drain_timeout", 5.0, True),
])
def test_only_worker_settings_change_the_checkpoint_hash(tmp_path: Path, section: str, key: str,
                                                         value: object, rolls: bool) -> None:
    def hash_of(cfg: object) -> str:
        return checkpoint_hash(identity(cfg, 0, 8100, [], [], "python", "vllm 0.32",  # type: ignore[arg-type]
                                        "cpu:test"))

    base = config(tmp_path)
    changed = config(tmp_path, **{section: {key: value}})
    assert (worker_view(base) != worker_view(changed)) is rolls  # type: ignore[arg-type]
    assert (hash_of(base) != hash_of(changed)) is rolls
