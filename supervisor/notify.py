"""The supervisor's side of sd_notify (through the `sdnotify` package).

Only the supervisor talks to systemd (`NotifyAccess=main`); workers are spawned without
`NOTIFY_SOCKET` and `WATCHDOG_*`. Sending never raises and never blocks: without systemd it
does nothing, and a socket that vanished or stopped reading loses the message.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import sdnotify

log = logging.getLogger(__name__)

# Variables a child must not inherit: they would let it speak to systemd for us.
SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS",
               "LISTEN_FDNAMES")


def watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """WATCHDOG_USEC when it is meant for this process (sd_watchdog_enabled's rules)."""
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner and owner != str(pid):
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    return usec if usec > 0 else None


class Notifier:
    """Reads NOTIFY_SOCKET and WATCHDOG_* from the process environment (as sdnotify does)."""

    def __init__(self) -> None:
        environ = os.environ
        self.socket_path = environ.get("NOTIFY_SOCKET") or None
        self._notifier = sdnotify.SystemdNotifier() if self.socket_path else None
        sock = getattr(self._notifier, "socket", None)
        if sock is not None:
            # A receiver that stops reading must never block the main loop (and with it the
            # watchdog): a message that does not fit is dropped, as sdnotify drops errors.
            sock.setblocking(False)
        usec = watchdog_usec(environ, os.getpid())
        self.watchdog_timeout = usec / 1e6 if usec else None
        self.watchdog_pings = 0
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return self._notifier is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Ping at half the timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_timeout / 2 if self.watchdog_timeout else None

    def send(self, *fields: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(fields))

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def ready(self, text: str) -> None:
        self._last_status = text
        self.send("READY=1", f"STATUS={text}")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> None:
        self.watchdog_pings += 1
        self.send("WATCHDOG=1")

    def stopping(self, text: str) -> None:
        self._last_status = text
        self.send("STOPPING=1", f"STATUS={text}")

    def reloading(self, text: str) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._last_status = text
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={text}")
