"""The marker watcher with real inotify: complete files only, delivered on the loop."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from dynamo_vllm.agent.snapshot import write_marker
from dynamo_vllm.contract.protocol import Marker
from dynamo_vllm.supervisor.checkpoint.watcher import MarkerWatcher


async def _collect(root: Path, actions: list, settle: float = 0.5) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    loop = asyncio.get_running_loop()
    watcher = MarkerWatcher(root, lambda worker, name: seen.append((worker, name)))
    watcher.start(loop)
    try:
        for action in actions:
            await asyncio.sleep(0.05)
            action()
        await asyncio.sleep(settle)
    finally:
        watcher.stop()
    return seen


def test_complete_markers_are_delivered(tmp_path: Path) -> None:
    root = tmp_path / "control"
    (root / "0").mkdir(parents=True, mode=0o700)
    (root / "1").mkdir(mode=0o700)
    held = {}

    def write_by_rename() -> None:
        write_marker(root / "0", Marker.READY, b'{"pid": 2, "hash": "h"}')

    def open_without_closing() -> None:
        held["f"] = open(root / "1" / Marker.READY, "wb")  # noqa: SIM115 - closed below
        held["f"].write(b"partial")
        held["f"].flush()

    def unrelated() -> None:
        (root / "0" / "notes.txt").write_text("x")
        (root / "stray-file").write_text("x")

    async def scenario() -> list[tuple[str, str]]:
        first = await _collect(root, [write_by_rename, open_without_closing, unrelated])
        assert ("1", Marker.READY) not in first, "a file still being written was delivered"
        held["f"].close()
        return first

    seen = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert seen == [("0", Marker.READY)]


def test_closing_a_written_file_delivers_it(tmp_path: Path) -> None:
    root = tmp_path / "control"
    (root / "0").mkdir(parents=True)

    def write_in_place() -> None:
        (root / "0" / Marker.RESTORE_COMPLETE).write_text("restored")

    seen = asyncio.run(asyncio.wait_for(_collect(root, [write_in_place]), 20))
    assert seen == [("0", Marker.RESTORE_COMPLETE)]


def test_the_start_scan_finds_markers_written_before(tmp_path: Path) -> None:
    root = tmp_path / "control"
    (root / "0").mkdir(parents=True)
    (root / "2").mkdir()
    (root / "0" / Marker.READY).write_text("{}")
    os.symlink("/etc/passwd", root / "2" / Marker.SNAPSHOT_COMPLETE)  # reported, not followed
    (root / "2" / "other").write_text("x")
    watcher = MarkerWatcher(root, lambda worker, name: None)
    assert watcher.scan() == [("0", Marker.READY), ("2", Marker.SNAPSHOT_COMPLETE)]


def test_a_removed_root_is_seen_and_watched_again_after_a_restart(tmp_path: Path) -> None:
    async def scenario() -> list[tuple[str, str]]:
        root = tmp_path / "control"
        (root / "0").mkdir(parents=True, mode=0o700)
        seen: list[tuple[str, str]] = []
        watcher = MarkerWatcher(root, lambda worker, name: seen.append((worker, name)))
        watcher.start(asyncio.get_running_loop())
        try:
            assert watcher.watching
            shutil.rmtree(root)
            for _ in range(50):
                if not watcher.watching:
                    break
                await asyncio.sleep(0.05)
            assert not watcher.watching
            (root / "0").mkdir(parents=True, mode=0o700)
            watcher.restart()
            assert watcher.watching
            await asyncio.sleep(0.1)
            write_marker(root / "0", Marker.READY, b'{"pid": 2, "hash": "h"}')
            await asyncio.sleep(0.5)
        finally:
            watcher.stop()
        return seen

    assert asyncio.run(scenario()) == [("0", Marker.READY)]
