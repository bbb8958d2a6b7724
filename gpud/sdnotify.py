"""sd_notify(3) in pure Python: READY=1, STATUS=, WATCHDOG=1, STOPPING=1 to $NOTIFY_SOCKET (if any)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self.address = address or None
        self.watchdog_sec = self._watchdog(environ)
        self._sock: socket.socket | None = None

    @staticmethod
    def _watchdog(environ: Mapping[str, str]) -> float | None:
        usec = environ.get("WATCHDOG_USEC")
        pid = environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            value = int(usec)
        except ValueError:
            return None
        return value / 1e6 if value > 0 else None

    def notify(self, *lines: str) -> bool:
        """Send one datagram; False when there is no systemd to tell (or it does not listen)."""
        if self.address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
