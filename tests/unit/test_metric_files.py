"""A worker's metric directory removed under it: put back with the files the worker still
writes (real prometheus_client multiprocess files, a real child process)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from dynamo_vllm.supervisor.metric_files import held_deleted, restore_directory
from tests.harness import child_holding

CHILD = """
import os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from prometheus_client import Counter
c = Counter("soak_requests", "requests")
c.inc()
print("ready", flush=True)
for line in sys.stdin:
    c.inc(int(line))
    print("done", flush=True)
"""


def _total(directory: Path) -> float:
    files = [str(p) for p in directory.glob("*.db")]
    for metric in MultiProcessCollector.merge(files, accumulate=True):
        if metric.name == "soak_requests":
            return sum(s.value for s in metric.samples if s.name == "soak_requests_total")
    return -1.0


def test_the_directory_comes_back_with_series_that_keep_counting(tmp_path: Path) -> None:
    directory = tmp_path / "metrics" / "worker0"
    directory.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(directory)], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        assert _total(directory) == 1.0
        shutil.rmtree(tmp_path / "metrics")
        held = held_deleted([child.pid], directory)
        assert list(held) == [f"counter_{child.pid}.db"]
        assert restore_directory(directory, [child.pid]) == 1
        assert oct(directory.stat().st_mode & 0o777) == "0o700"
        # The worker writes to the unlinked file; the supervisor reads it through the link.
        child.stdin.write("41\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        assert _total(directory) == 42.0
        # Twice is harmless: nothing is linked over what is there.
        assert restore_directory(directory, [child.pid]) == 0
    finally:
        child.kill()
        child.wait(10)


def test_files_of_other_directories_and_live_files_are_left_alone(tmp_path: Path) -> None:
    mine, other = tmp_path / "mine", tmp_path / "other"
    mine.mkdir()
    other.mkdir()
    with child_holding(f"a = open({str(other / 'x.db')!r}, 'w'); "
                       f"b = open({str(mine / 'live.db')!r}, 'w'); "
                       f"c = open({str(mine / 'sub.txt')!r}, 'w')") as pid:
        (other / "x.db").unlink()
        (mine / "sub.txt").unlink()
        assert held_deleted([pid], mine) == {}
        assert held_deleted([999_999_999], mine) == {}


@pytest.mark.parametrize("restored_as", ["counter_77.db.cr.1a.ghost", "counter_77.db.cr_link"])
def test_files_a_restore_brought_back_removed_are_found_by_their_name(
        tmp_path: Path, restored_as: str) -> None:
    """After a checkpoint of a life whose directory had been removed, CRIU restores the
    files unlinked, as "ghost" files (NAME.cr.HEX.ghost) or link-remap files
    (NAME.cr_link, what CRIU 4.2 did in the soak)."""
    directory = tmp_path / "worker0"
    directory.mkdir()
    ghost = directory / restored_as
    with child_holding(f"f = open({str(ghost)!r}, 'w')") as pid:
        ghost.unlink()
        held = held_deleted([pid], directory)
        assert list(held) == ["counter_77.db"]
