"""The credential control needs by default: without `workers.control_token_file` the
supervisor writes a fresh token into its private runtime directory at every start (0600,
the service user's; root reads it too), points its workers at it through the effective
config, and the CLI finds it there. Another local account, on loopback or not, is refused.

A new token per start: a restart rotates it, and restored workers, which read the token
file again whenever it changes (`contract.gate.TokenFile`), follow.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from pathlib import Path

from dynamo_vllm.contract.config import Config
from dynamo_vllm.contract.gate import TokenError, TokenFile, load_token
from dynamo_vllm.contract.markers import write_marker
from dynamo_vllm.supervisor.privilege import WorkerAccount
from dynamo_vllm.supervisor.startup import StartupError

TOKEN_NAME = "control.token"


def with_default_token(config: Config, runtime_dir: Path) -> Config:
    """`config` with the runtime directory's token when it names no token file."""
    if config.workers.control_token_file:
        return config
    return replace(config, workers=replace(config.workers,
                                           control_token_file=str(runtime_dir / TOKEN_NAME)))


def write_fresh_token(path: Path) -> None:
    """A new random token at `path`, written whole (a reader never sees half of it) and
    private from its first byte: as a marker is."""
    write_marker(path.parent, path.name, (secrets.token_urlsafe(32) + "\n").encode())


def open_token(config: Config, runtime_dir: Path, account: WorkerAccount | None) -> TokenFile:
    """The token control needs, at start: the runtime directory's written fresh (and handed
    to the workers' account when they run as another), or the operator's checked."""
    path = config.workers.control_token_file
    try:
        if Path(path) == runtime_dir / TOKEN_NAME:
            write_fresh_token(Path(path))
            if account is not None:
                account.hand_over(Path(path), 0o600)
        load_token(path)
        return TokenFile(path)
    except OSError as exc:
        raise StartupError(f"workers.control_token_file: cannot write {path}: "
                           f"{exc.strerror or exc}") from None
    except TokenError as exc:
        raise StartupError(f"workers.control_token_file: {exc}") from None
