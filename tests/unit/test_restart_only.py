"""A reload names the settings only a restart applies (supervisor/restart_only.py)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from dynamo_vllm.contract.config import from_dict
from dynamo_vllm.contract.settings import SECTIONS
from dynamo_vllm.supervisor import reload as reload_module
from dynamo_vllm.supervisor.control_token import with_default_token
from dynamo_vllm.supervisor.restart_only import (
    AT_CHECKPOINT_START,
    AT_FRONTEND_START,
    AT_START,
    restart_only_changes,
)
from tests.unit.test_tasks import supervisor

ROOT = Path(__file__).resolve().parents[2]


def config(tmp_path: Path, **sections: dict[str, Any]) -> Any:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return from_dict({"model": {"path": str(model)}, **sections}, check_paths=False)


def test_every_named_key_is_a_setting() -> None:
    known = {f"{name}.{key}" for name, cls in SECTIONS.items()
             for key in cls.__dataclass_fields__}
    named = {*AT_START, *AT_CHECKPOINT_START, *AT_FRONTEND_START}
    assert named <= known, named - known


def test_only_what_a_restart_applies_is_named(tmp_path: Path) -> None:
    old = config(tmp_path)
    new = config(tmp_path, metrics={"port": 9500}, workers={"count": 3},
                 engine={"max_num_seqs": 4}, checkpoint={"keep": 5},
                 frontend={"router_mode": "random"})
    # count and the engine apply (start/stop, roll); checkpoints and the frontend are off.
    assert [key for key, _ in restart_only_changes(old, new)] == ["metrics.port"]


def test_checkpoint_and_frontend_keys_count_when_those_are_on(tmp_path: Path) -> None:
    old = config(tmp_path, checkpoint={"enabled": True},
                 dynamo={"enabled": True}, frontend={"enabled": True})
    new = config(tmp_path, checkpoint={"enabled": True, "keep": 5},
                 dynamo={"enabled": True, "host": "10.0.0.7"},
                 frontend={"enabled": True, "port": 8080})
    assert [key for key, _ in restart_only_changes(old, new)] == [
        "checkpoint.keep", "dynamo.host", "frontend.port"]
    turned_off = config(tmp_path)
    assert ("checkpoint.enabled", "checkpointing is set up when the supervisor starts") in \
        restart_only_changes(old, turned_off)


def test_a_reload_names_them_in_the_log_and_status(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    service, notifier = supervisor(tmp_path)
    changed = config(tmp_path, metrics={"port": 9500})

    async def apply(supervisor: Any) -> bool:
        # What _apply does, without starting workers.
        supervisor.config = with_default_token(changed, supervisor.runtime_dir)
        return False

    monkeypatch.setattr(reload_module, "_apply", apply)
    with caplog.at_level(logging.WARNING):
        asyncio.run(reload_module.reload(service))
    kind, text = notifier.sent[-1]
    assert kind == "ready" and text.endswith("; restart to apply metrics.port"), text
    assert "metrics.port changed, not applied" in caplog.text
    # It stays in STATUS= until a restart, through the main loop's updates.
    assert service.status_line(0.0).endswith("; restart to apply metrics.port")
    assert service.reloads.as_dict() == {"started": 1, "finished": 1,
                                         "outcome": "done; restart to apply metrics.port",
                                         "restart_pending": ["metrics.port"]}


def test_the_operations_guide_lists_them() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text()
    section = guide[guide.index("## What a reload applies"):]
    for key in (*AT_START, *AT_CHECKPOINT_START, "frontend.*", "dynamo.*",
                "metrics.namespace", "discovery.etcd_endpoints"):
        assert f"`{key}`" in section, key
