"""The `file` discovery backend: one JSON document per worker, written atomically.

`<dir>/<instance>-worker<I>.json` exists exactly while worker I serves. Readers never see
a partial document: it is written to a temporary file in the same directory and renamed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dynamo_vllm.contract.discovery import EndpointRecord


def record_path(directory: Path, instance: str, worker: int) -> Path:
    return directory / f"{instance}-worker{worker}.json"


class FileDiscovery:
    def __init__(self, directory: Path, instance: str, worker: int):
        self.directory = directory
        self.path = record_path(directory, instance, worker)

    async def register(self, record: EndpointRecord) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(record.to_dict(), fh, sort_keys=True)
                fh.write("\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    async def unregister(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def read_records(directory: Path) -> list[dict[str, Any]]:
    """Every complete record in `directory` (unreadable or malformed ones are skipped)."""
    records = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = directory / name
        if path.is_symlink():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            records.append(data)
    return records
