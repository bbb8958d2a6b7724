"""The proxy's listening socket and its connection limit (nginx's worker_connections).

Above `max_connections`, a new connection gets a canned 503 and is closed at once, so that file descriptors
stay for the replicas' connections and the control socket. The per-connection deadlines (a request head that
never comes, a stalled body, a client that stops reading) live with the connection (gpud.proxy.connection).

With several proxy workers each binds its own socket to the same address with SO_REUSEPORT (SPEC §14), and
the kernel spreads new connections over them.
"""

from __future__ import annotations

import asyncio
import resource
import socket
from collections.abc import Callable

from gpud.proxy.message import error_response

# File descriptors kept out of the connection limit's reach: the daemon link, replica connections beyond the
# one per client, metrics files.
_FD_RESERVE = 256

BUSY = error_response(503, "The gpud proxy has too many open connections right now; retry shortly.", "server_error",
                      "too_many_connections", extra=((b"Retry-After", b"1"),), keep_alive=False)


def auto_max_connections(soft_limit: int | None = None) -> int:
    """Client connections the process can hold: each may pair with one connection to a replica, and some
    descriptors stay in reserve. At least 16, so a tiny limit still serves something."""
    if soft_limit is None:
        soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit == resource.RLIM_INFINITY:
        soft_limit = 1 << 20
    return max(16, (soft_limit - _FD_RESERVE) // 2)


class Refused(asyncio.Protocol):
    """A connection over the limit: answer 503 and close (the kernel already accepted it)."""

    def __init__(self, on_refused: Callable[[], None]) -> None:
        self._on_refused = on_refused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._on_refused()
        transport.write(BUSY)  # type: ignore[attr-defined]
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass


def bound_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to host:port (not listening yet); OSError as bind raises it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def listen_socket(host: str, port: int, *, reuse_port: bool, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket; OSError as bind/listen raise it."""
    sock = bound_socket(host, port, reuse_port=reuse_port)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
