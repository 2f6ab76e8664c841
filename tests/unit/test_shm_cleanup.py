"""The /dev/shm files of a dead worker tree: found while it runs, removed after, and
nothing outside /dev/shm is ever touched."""

from __future__ import annotations

import uuid
from pathlib import Path

from dynamo_vllm.supervisor.shm import SHM, remove, shm_files, tree_pids
from tests.harness import child_holding


def test_a_trees_shared_memory_is_found_and_removed(tmp_path: Path) -> None:
    name = SHM / f"dynamo-vllm-test-{uuid.uuid4().hex}"
    name.write_bytes(b"\0" * 4096)
    outside = tmp_path / "not-shm"
    outside.write_text("keep me")
    # A child that maps the file, as vLLM's engine processes map their queues.
    with child_holding(f"import mmap; f = open({str(name)!r}, 'r+b'); "
                       "m = mmap.mmap(f.fileno(), 4096)") as pid:
        found = shm_files(tree_pids(pid))
        assert str(name) in found
    assert remove(found | {str(outside), "/etc/hostname"}) >= 1
    assert not name.exists()
    assert outside.read_text() == "keep me" and Path("/etc/hostname").exists()
