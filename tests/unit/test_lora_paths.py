"""The LoRA path rules on a real filesystem: only directories under the allowed roots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dynamo_vllm.agent.lora import AdapterRefused, adapter_name, resolve_adapter_dir


def adapter(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


def refused(raw: str, roots: list[str]) -> AdapterRefused:
    with pytest.raises(AdapterRefused) as info:
        resolve_adapter_dir(raw, roots)
    return info.value


def test_an_adapter_under_a_root_resolves(tmp_path: Path) -> None:
    good = adapter(tmp_path / "roots" / "a")
    assert resolve_adapter_dir(str(good), [str(tmp_path / "roots")]) == good.resolve()
    # A symlink that stays inside the root is fine; the real path is what the engine gets.
    os.symlink(good, tmp_path / "roots" / "alias")
    assert resolve_adapter_dir(str(tmp_path / "roots" / "alias"),
                               [str(tmp_path / "roots")]) == good.resolve()


def test_escapes_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "roots"
    root.mkdir()
    outside = adapter(tmp_path / "outside")
    os.symlink(outside, root / "link")
    inner = root / "inner"
    inner.mkdir()
    (inner / "adapter_config.json").write_text("{}")
    os.symlink(outside / "adapter_model.safetensors", inner / "adapter_model.safetensors")
    # A root that is a prefix of another directory's name does not cover it.
    sibling = adapter(tmp_path / "roots-evil" / "a")
    for raw in (str(outside), str(root / ".." / "outside"), str(root / "link"), str(inner),
                str(sibling)):
        error = refused(raw, [str(root)])
        assert error.code == 403, raw


def test_a_symlink_deep_in_the_adapter_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "roots"
    deep = adapter(root / "a")
    (deep / "sub" / "subsub").mkdir(parents=True)
    secret = tmp_path / "outside" / "key.pem"
    secret.parent.mkdir()
    secret.write_text("private")
    os.symlink(secret, deep / "sub" / "subsub" / "weights.bin")
    error = refused(str(deep), [str(root)])
    assert error.code == 403 and "sub/subsub/weights.bin" in str(error), error


def test_other_refusals(tmp_path: Path) -> None:
    root = tmp_path / "roots"
    root.mkdir()
    assert refused(str(root), []).code == 403
    assert refused("relative", [str(root)]).code == 400
    assert refused(str(root / "missing"), [str(root)]).code == 404
    assert refused(str(root), [str(root)]).code == 400  # no adapter_config.json


@pytest.mark.parametrize("name", ["", "../x", "a/b", "-x", "x" * 129, "a b"])
def test_bad_names(name: str) -> None:
    with pytest.raises(AdapterRefused):
        adapter_name({"lora_name": name})
