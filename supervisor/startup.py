"""Problems found before anything is spawned, reported as config errors (exit 78)."""

from __future__ import annotations

import socket


class StartupError(Exception):
    """Found before anything is spawned (a port in use, GPUs that do not exist)."""


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
