"""Dynamo's environment-variable checkpoint protocols, beside the control directory (G4).

Older Dynamo tooling drives a worker by environment variables and files instead of a control
directory (reference/dynamo.md, "G1" and "G2"):

- **signal file** (on when `DYN_CHECKPOINT_SIGNAL_FILE` is set; needs the five names of
  `SIGNAL_FILE_NAMES`): the worker sleeps, removes a stale signal file or restore marker,
  writes `DYN_READY_FOR_CHECKPOINT_FILE`, then looks
  every second for the restore marker (`DYN_RESTORE_MARKER_FILE`: restored, serve) or the
  signal file (JSON; `"success": true`: the checkpoint is taken, exit). With `pvc` storage, a
  `<DYN_CHECKPOINT_LOCATION>/checkpoint.done` that says `"success": true` means the
  checkpoint exists already: the worker exits at once, before loading the model.
- **Unix signals** (on when only `DYN_READY_FOR_CHECKPOINT_FILE` is set): the worker sleeps,
  writes the ready file and waits for SIGUSR1 (checkpoint taken: exit), SIGCONT (restored:
  serve) or SIGUSR2 (the checkpoint failed: serve without one).

A malformed signal file is reported and ignored (the wait goes on); one that reports a
failure ends the wait and the worker serves cold, as it does when nobody answers within
`checkpoint.timeout`. Files are read without following symlinks.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dynamo_vllm.contract.markers import MarkerError, read_marker

log = logging.getLogger(__name__)

SIGNAL_FILE = "DYN_CHECKPOINT_SIGNAL_FILE"
READY_FILE = "DYN_READY_FOR_CHECKPOINT_FILE"
STORAGE_TYPE = "DYN_CHECKPOINT_STORAGE_TYPE"
LOCATION = "DYN_CHECKPOINT_LOCATION"
RESTORE_MARKER = "DYN_RESTORE_MARKER_FILE"
SIGNAL_FILE_NAMES = (SIGNAL_FILE, READY_FILE, STORAGE_TYPE, LOCATION, RESTORE_MARKER)
DONE_FILE = "checkpoint.done"
POLL_S = 1.0  # Dynamo's polling period for the signal-file protocol


class EnvProtocol(enum.StrEnum):
    SIGNAL_FILE = "signal-file"
    UNIX_SIGNALS = "unix-signals"


class Verdict(enum.StrEnum):
    RESTORED = "restored"
    CHECKPOINTED = "checkpointed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True)
class EnvCheckpoint:
    protocol: EnvProtocol
    ready_file: Path
    signal_file: Path | None = None
    restore_marker: Path | None = None
    storage_type: str = "pvc"
    location: Path | None = None


def env_checkpoint(environ: Mapping[str, str]) -> tuple[EnvCheckpoint | None, list[str]]:
    """The protocol the environment asks for (None: neither), and every problem with it."""
    if environ.get(SIGNAL_FILE):
        missing = [name for name in SIGNAL_FILE_NAMES if not environ.get(name)]
        if missing:
            return None, [f"{SIGNAL_FILE} is set, so the signal-file protocol needs "
                          f"{', '.join(missing)} too"]
        paths = {name: Path(environ[name]) for name in
                 (SIGNAL_FILE, READY_FILE, LOCATION, RESTORE_MARKER)}
        problems = [f"{name}: {path} is not an absolute path" for name, path in paths.items()
                    if not path.is_absolute()]
        return EnvCheckpoint(EnvProtocol.SIGNAL_FILE, paths[READY_FILE], paths[SIGNAL_FILE],
                             paths[RESTORE_MARKER], environ[STORAGE_TYPE],
                             paths[LOCATION]), problems
    if environ.get(READY_FILE):
        ready = Path(environ[READY_FILE])
        problems = [] if ready.is_absolute() else [f"{READY_FILE}: {ready} is not an "
                                                   "absolute path"]
        location = environ.get(LOCATION)
        return EnvCheckpoint(EnvProtocol.UNIX_SIGNALS, ready,
                             storage_type=environ.get(STORAGE_TYPE) or "pvc",
                             location=Path(location) if location else None), problems
    return None, []


def _read_json(path: Path) -> dict[str, object] | None:
    """A small JSON file, read without following a symlink; None when absent. Raises
    MarkerError when it is there but unusable."""
    content = read_marker(path.parent, path.name)
    if content is None:
        return None
    try:
        data = json.loads(content)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MarkerError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("success"), bool):
        raise MarkerError(f'{path}: needs a JSON object with a boolean "success"')
    return data


def checkpoint_already_taken(spec: EnvCheckpoint) -> bool:
    """Signal-file protocol, pvc storage: a `checkpoint.done` with success true means this
    checkpoint exists, and the worker has nothing to do."""
    if spec.protocol is not EnvProtocol.SIGNAL_FILE or spec.storage_type != "pvc" \
            or spec.location is None:
        return False
    try:
        done = _read_json(spec.location / DONE_FILE)
    except MarkerError as exc:
        log.warning("%s; checkpointing again", exc)
        return False
    return bool(done and done["success"])


def _write_ready(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write("ready")


async def wait_env_checkpointer(spec: EnvCheckpoint, timeout: float) -> tuple[Verdict, float]:
    """Write the ready file and wait for the answer; returns it and the seconds waited. The
    ready file is removed at the end, whatever the answer."""
    started = time.monotonic()
    # An answer left from an earlier attempt is not this one's (as the control directory's
    # stale markers are removed before `ready-for-snapshot`).
    for stale in (spec.signal_file, spec.restore_marker):
        if stale is not None:
            _unlink(stale)
    _write_ready(spec.ready_file)
    log.info("ready for a checkpoint (%s, %s protocol); waiting up to %.0f s",
             spec.ready_file, spec.protocol, timeout)
    try:
        if spec.protocol is EnvProtocol.SIGNAL_FILE:
            verdict = await _poll_files(spec, timeout)
        else:
            verdict = await _wait_signals(timeout)
        return verdict, time.monotonic() - started
    finally:
        _unlink(spec.ready_file)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _poll_files(spec: EnvCheckpoint, timeout: float) -> Verdict:
    assert spec.signal_file is not None and spec.restore_marker is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if read_marker(spec.restore_marker.parent, spec.restore_marker.name) is not None:
                return Verdict.RESTORED
            answer = _read_json(spec.signal_file)
        except MarkerError as exc:
            log.warning("checkpoint signal: %s; ignored", exc)
            answer = None
        if answer is not None:
            if answer["success"]:
                return Verdict.CHECKPOINTED
            log.error("the checkpoint failed: %s; serving without one",
                      answer.get("error") or "no reason given")
            return Verdict.FAILED
        await asyncio.sleep(POLL_S)
    return Verdict.TIMED_OUT


async def _wait_signals(timeout: float) -> Verdict:
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[Verdict] = loop.create_future()
    meaning = {signal.SIGUSR1: Verdict.CHECKPOINTED, signal.SIGCONT: Verdict.RESTORED,
               signal.SIGUSR2: Verdict.FAILED}

    def answered(verdict: Verdict) -> None:
        if not answer.done():
            answer.set_result(verdict)

    for signum, verdict in meaning.items():
        loop.add_signal_handler(signum, answered, verdict)
    try:
        verdict = await asyncio.wait_for(answer, timeout)
    except TimeoutError:
        return Verdict.TIMED_OUT
    finally:
        for signum in meaning:
            loop.remove_signal_handler(signum)
    if verdict is Verdict.FAILED:
        log.error("the checkpointer reported a failure (SIGUSR2); serving without a checkpoint")
    return verdict
