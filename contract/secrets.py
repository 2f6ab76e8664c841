"""Which settings and environment variables are secrets, and how they appear where they must
not be read back: redacted in `config show`, as digests in a checkpoint's identity (the
hash then changes when a secret is rotated, so a restore never brings back a worker that
still accepts the old one, and the stored metadata holds no secret)."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# vLLM's `api_key` and anything named like a credential.
_SECRET_NAME = re.compile(r"(^|[_-])(api[_-]?key|key|token|secret|password|passwd|credentials?)$",
                          re.IGNORECASE)
# Files name where a secret is, not the secret: `control_token_file`, `ssl_keyfile`.
_NOT_SECRET = re.compile(r"(_file|_path|_dir|file|_files)$", re.IGNORECASE)
REDACTED = "<redacted>"
MAX_SECRET_BYTES = 4096


class SecretFileError(Exception):
    pass


def read_private_file(path: str) -> bytes:
    """The content of a secret's file: a regular file (opened without blocking, so a FIFO
    cannot hang us), with no group or other permission bits, of at most 4 KiB."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise SecretFileError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SecretFileError(f"{path} is not a regular file")
        if info.st_mode & 0o077:
            raise SecretFileError(f"{path} is readable or writable by group or others "
                                  f"(mode {info.st_mode & 0o777:o}); chmod 600 it")
        raw = f.read(MAX_SECRET_BYTES + 1)
    if len(raw) > MAX_SECRET_BYTES:
        raise SecretFileError(f"{path} is larger than {MAX_SECRET_BYTES} bytes")
    return raw


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name)) and not _NOT_SECRET.search(name)


def digest(value: Any) -> str:
    return "sha256:" + hashlib.sha256(str(value).encode()).hexdigest()[:16]


def redact_engine(engine: Mapping[str, Any], with_digest: bool = False) -> dict[str, Any]:
    """The [engine] table with secret values replaced (by a digest, for a hash)."""
    return {key: (digest(value) if with_digest else REDACTED) if is_secret_name(key) else value
            for key, value in engine.items()}


def secret_environment(env: Mapping[str, str]) -> dict[str, str]:
    """Digests of the environment's secrets, by name: what a worker inherits and a restore
    would bring back from the image."""
    return {name: digest(value) for name, value in sorted(env.items())
            if is_secret_name(name)}


def exposed_secrets(engine: Mapping[str, Any], path: Path) -> str | None:
    """A warning when the config file at `path` holds a secret and others may read it."""
    secrets = [f"engine.{key}" for key in engine if is_secret_name(key)]
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    if not secrets or not mode & 0o044:
        return None
    return (f"{', '.join(secrets)}: {path} is readable by others (mode {mode:o}); keep the "
            "key out of it, in /etc/dynamo-vllm/NAME.env (mode 600) as VLLM_API_KEY=...")
