"""The gate in front of every state-changing route, the worker's and the supervisor's: who
may call (loopback unless `workers.control_from_network`), with what credential (the bearer
token of `workers.control_token_file`), and how much of a body is read.

A credential is required by default: without `workers.control_token_file` the supervisor
writes a fresh token into its private runtime directory at every start and its workers and
the CLI (as root or the service user) read it there, so another local account is refused
even on loopback. Loopback is decided from the socket's peer, never from a header. The token
file must be private (no group or other permission bits), as systemd's LoadCredential=
leaves it, and it is read again whenever it changes: a rotated token takes effect in running
and restored workers alike.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from typing import Any

from dynamo_vllm.contract.secrets import SecretFileError, read_private_file

# The largest request body a control route reads.
MAX_BODY = 64 * 1024


class TokenError(Exception):
    pass


def load_token(path: str) -> str:
    """The token in `path` (surrounding whitespace removed); TokenError says what is wrong."""
    try:
        raw = read_private_file(path)
    except SecretFileError as exc:
        raise TokenError(str(exc)) from None
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise TokenError(f"{path}: the token must be printable ASCII") from None
    if len(token) < 16 or not token.isprintable() or " " in token:
        raise TokenError(f"{path}: the token must be at least 16 printable characters "
                         "without spaces")
    return token


class TokenFile:
    """The token of a file, read again whenever the file changes (another inode, size or
    mtime): a token rotated by a restart or by hand reaches a worker that keeps running,
    one restored from a checkpoint included, which the read-once token did not."""

    def __init__(self, path: str):
        self.path = path
        self._seen: tuple[int, ...] | None = None
        self._token = ""

    def current(self) -> str:
        try:
            info = os.stat(self.path)
        except OSError as exc:
            raise TokenError(f"cannot read {self.path}: {exc.strerror}") from None
        seen = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        if seen != self._seen:
            self._token = load_token(self.path)
            self._seen = seen
        return self._token


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


class BadRequest(Exception):
    """A request body or query that cannot be honoured: a 400 with this message."""


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)


def refusal(client: str | None, authorization: str | None, *, from_network: bool,
            token: TokenFile | None, needs_token: bool = True) -> tuple[int, str] | None:
    """(status, message) when the gate refuses this caller, None when it may go on.
    `client` is the socket's peer address. A token file that cannot be read closes the
    gate (503) rather than opening it."""
    if not from_network and not is_loopback(client):
        return 403, ("control routes answer loopback clients only "
                     "(workers.control_from_network)")
    if not needs_token or token is None:
        return None
    try:
        expected = token.current()
    except TokenError as exc:
        return 503, f"control is closed: the token file: {exc}"
    if not authorized(authorization, expected):
        return 401, ("this route needs the bearer token of workers.control_token_file "
                     "(Authorization: Bearer ...)")
    return None


def parse_body(raw: bytes) -> dict[str, Any]:
    """A JSON object body (empty or `null`: {}); BadRequest says what is wrong."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body
