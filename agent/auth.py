"""The optional bearer token of the state-changing routes (`workers.control_token_file`).

Loopback-only is the default protection; an operator who exposes the control routes
(`workers.control_from_network`) should also set a token. The token file must be private
(no group or other permission bits), as systemd's LoadCredential= leaves it.
"""

from __future__ import annotations

import hmac
import os
import stat

MAX_TOKEN_BYTES = 4096


class TokenError(Exception):
    pass


def load_token(path: str) -> str:
    """The token in `path` (surrounding whitespace removed); TokenError says what is wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise TokenError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise TokenError(f"{path} is not a regular file")
        if info.st_mode & 0o077:
            raise TokenError(f"{path} is readable or writable by group or others "
                             f"(mode {info.st_mode & 0o777:o}); chmod 600 it")
        raw = f.read(MAX_TOKEN_BYTES + 1)
    if len(raw) > MAX_TOKEN_BYTES:
        raise TokenError(f"{path} is larger than {MAX_TOKEN_BYTES} bytes")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise TokenError(f"{path}: the token must be printable ASCII") from None
    if len(token) < 16 or not token.isprintable() or " " in token:
        raise TokenError(f"{path}: the token must be at least 16 printable characters "
                         "without spaces")
    return token


def authorized(header: str | None, token: str | None) -> bool:
    """True when no token is required, or `header` is `Bearer <token>` (constant time)."""
    if not token:
        return True
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              token.encode())


def header_for(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}
