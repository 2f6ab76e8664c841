"""The /dev/shm files of a dead worker tree: found while it runs, removed after, and
nothing outside /dev/shm is ever touched."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from dynamo_vllm.supervisor.shm import SHM, remove, shm_files, tree_pids


def test_a_trees_shared_memory_is_found_and_removed(tmp_path: Path) -> None:
    name = SHM / f"dynamo-vllm-test-{uuid.uuid4().hex}"
    name.write_bytes(b"\0" * 4096)
    outside = tmp_path / "not-shm"
    outside.write_text("keep me")
    # A child that maps the file, as vLLM's engine processes map their queues.
    child = subprocess.Popen([sys.executable, "-c", (
        "import mmap, sys, time\n"
        f"f = open({str(name)!r}, 'r+b'); m = mmap.mmap(f.fileno(), 4096)\n"
        "print('mapped', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "mapped"
        found = shm_files(tree_pids(child.pid))
        assert str(name) in found
    finally:
        child.kill()
        child.wait(10)
    assert remove(found | {str(outside), "/etc/hostname"}) >= 1
    assert not name.exists()
    assert outside.read_text() == "keep me" and Path("/etc/hostname").exists()
