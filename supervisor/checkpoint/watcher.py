"""The marker watcher: a `watchdog` (inotify) observer on the workers' control directories.

Layout: `<root>/<worker>/<marker>`. Only complete files count: a close after writing or a
rename into place, never "created" (a file being written is not a marker yet). Events are
handed to the asyncio loop with `call_soon_threadsafe`, the only thread-safe way in; a scan
at start finds markers written while the supervisor was down.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirMovedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from dynamo_vllm.contract.protocol import Marker

log = logging.getLogger(__name__)

# (worker name, marker name)
MarkerCallback = Callable[[str, str], None]
WATCHED = (Marker.READY, Marker.RESTORE_COMPLETE, Marker.SNAPSHOT_COMPLETE)


def _split(root: Path, path: str | bytes) -> tuple[str, str] | None:
    text = os.fsdecode(path)
    try:
        relative = Path(text).relative_to(root)
    except ValueError:
        return None
    if len(relative.parts) != 2 or relative.parts[1] not in WATCHED:
        return None
    return relative.parts[0], relative.parts[1]


class _Handler(FileSystemEventHandler):
    def __init__(self, root: Path, loop: asyncio.AbstractEventLoop, callback: MarkerCallback):
        self.root = root
        self.loop = loop
        self.callback = callback

    def _deliver(self, path: str | bytes) -> None:
        found = _split(self.root, path)
        if found is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.callback, *found)

    def on_closed(self, event: FileClosedEvent) -> None:
        self._deliver(event.src_path)

    def on_moved(self, event: DirMovedEvent | FileMovedEvent) -> None:
        self._deliver(event.dest_path)

    def on_any_event(self, event: FileSystemEvent) -> None:
        pass


class MarkerWatcher:
    def __init__(self, root: Path, callback: MarkerCallback):
        self.root = root
        self.callback = callback
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        return self._observer is not None

    @property
    def watching(self) -> bool:
        """False once inotify dropped the root's watch (the root was removed)."""
        observer = self._observer
        return observer is not None and all(e.is_alive() for e in observer.emitters)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._loop = loop
        observer = Observer()
        observer.schedule(_Handler(self.root, loop, self.callback), str(self.root),
                          recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def scan(self) -> list[tuple[str, str]]:
        """Markers present now (written while nobody watched)."""
        found: list[tuple[str, str]] = []
        if not self.root.is_dir():
            return found
        for worker in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not worker.is_dir(follow_symlinks=False):
                continue
            for name in WATCHED:
                if os.path.lexists(os.path.join(worker.path, name)):
                    found.append((worker.name, name))
        return found

    def restart(self) -> None:
        """After the root was removed (inotify dropped its watch with it)."""
        assert self._loop is not None
        self.stop()
        self.start(self._loop)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
