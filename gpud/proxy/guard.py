"""Protection of the proxy against slow, stuck and too many clients (nginx's client_header_timeout,
client_body_timeout, send_timeout and worker_connections, for an aiohttp server).

What aiohttp's server gives on its own: limits on request-line and header sizes (answered with 4xx), and a
keep-alive timeout that closes a connection idle between two requests, also when the next request head is
only half sent. What it does not give, and this module adds:

* `Listener`: the TCP listener, with
  - a connection limit: above `max_connections`, a new connection gets a canned 503 and is closed at once,
    so that file descriptors stay for the replicas' connections and the control socket;
  - a deadline for the *first* request head of a connection (aiohttp up to 3.13 arms no timer before the
    first request, so a client trickling header bytes held its connection forever).
* `Stall`: a per-request watchdog that cuts the client connection when reading the request body or writing
  the response makes no progress for `timeout` seconds (a client that stops sending, or stops reading a
  stream: without it, such a request would hold its replica slot and its buffers forever).

Both use plain loop timers, one per connection or request, never a task per read or write: the proxy's hot
path stays as cheap as it was.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections.abc import Callable

from aiohttp import web

log = logging.getLogger(__name__)

# File descriptors kept out of the connection limit's reach: the control socket and its clients, replica
# log files and pipes, health checks, the state file.
_FD_RESERVE = 256

_BUSY_BODY = json.dumps(
    {
        "error": {
            "message": "The gpud proxy has too many open connections right now; retry shortly.",
            "type": "server_error",
            "param": None,
            "code": "too_many_connections",
        }
    }
).encode()
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


def auto_max_connections(soft_limit: int | None = None) -> int:
    """Client connections the process can hold: each may pair with one connection to a replica, and some
    descriptors stay in reserve. At least 16, so a tiny limit still serves something."""
    if soft_limit is None:
        soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit == resource.RLIM_INFINITY:
        soft_limit = 1 << 20
    return max(16, (soft_limit - _FD_RESERVE) // 2)


class _Refused(asyncio.Protocol):
    """A connection over the limit: answer 503 and close (the kernel already accepted it)."""

    def __init__(self, on_refused: Callable[[], None]) -> None:
        self._on_refused = on_refused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._on_refused()
        transport.write(_BUSY)  # type: ignore[attr-defined]
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, seen through a wrapper that tells the Listener when it ends."""

    __slots__ = ("_inner", "_listener")

    def __init__(self, inner: asyncio.Protocol, listener: Listener) -> None:
        self._inner = inner
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener.closed(self._inner)
        self._inner.connection_lost(exc)


class Listener:
    """Accepts TCP connections for an aiohttp `web.Server`, with a connection limit and a first-head
    deadline. Call `request_seen(request)` from the handler: it marks the connection's head as complete."""

    def __init__(
        self,
        server: web.Server,
        *,
        max_connections: int,
        head_timeout: float,
        on_refused: Callable[[], None] = lambda: None,
        on_head_timeout: Callable[[], None] = lambda: None,
    ) -> None:
        self._server = server
        self.max_connections = max_connections or auto_max_connections()
        self._head_timeout = head_timeout
        self._on_refused = on_refused
        self._on_head_timeout = on_head_timeout
        self._loop = asyncio.get_running_loop()
        # Connections whose first request head has not arrived yet, with the timer that cuts them. The timer
        # is cancelled when the head comes: a pending timer would keep the connection's objects alive.
        self._awaiting_head: dict[asyncio.BaseProtocol, asyncio.TimerHandle] = {}
        self._open = 0
        self._tcp: asyncio.Server | None = None

    async def listen(self, host: str, port: int, *, backlog: int = 1024) -> None:
        """Bind and listen; OSError as from loop.create_server."""
        self._tcp = await self._loop.create_server(self._accept, host, port, backlog=backlog)

    @property
    def address(self) -> tuple[str, int] | None:
        if self._tcp is None or not self._tcp.sockets:
            return None
        host, port = self._tcp.sockets[0].getsockname()[:2]
        return host, port

    def close(self) -> None:
        """Stop accepting (the aiohttp runner's cleanup then closes the open connections)."""
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None

    def request_seen(self, request: web.BaseRequest) -> None:
        timer = self._awaiting_head.pop(request.protocol, None)
        if timer is not None:
            timer.cancel()

    def closed(self, protocol: asyncio.BaseProtocol) -> None:
        """A counted connection ended."""
        self._open -= 1
        timer = self._awaiting_head.pop(protocol, None)
        if timer is not None:
            timer.cancel()

    def _accept(self) -> asyncio.BaseProtocol:
        # Counted here, not with web.Server.connections: that list grows only once connection_made runs,
        # which asyncio schedules after accepting a whole batch, so a burst would slip past the limit.
        if self._open >= self.max_connections:
            return _Refused(self._on_refused)
        self._open += 1
        protocol = self._server()
        self._awaiting_head[protocol] = self._loop.call_later(self._head_timeout, self._head_deadline, protocol)
        return _Counted(protocol, self)

    def _head_deadline(self, protocol: asyncio.BaseProtocol) -> None:
        if self._awaiting_head.pop(protocol, None) is None:
            return
        transport = getattr(protocol, "transport", None)  # None once the connection is gone
        if transport is not None:
            self._on_head_timeout()
            transport.abort()


class Stall:
    """Cuts a client connection that makes no progress for `timeout` seconds while the proxy waits on it.

    The proxy calls `waiting()` when it starts (or makes progress in) a read from or a write to the client,
    and `done()` when that wait is over; time spent waiting on the replica does not count. One timer,
    re-armed only when it fires.
    """

    __slots__ = ("_loop", "_transport", "_timeout", "_since", "_handle", "fired")

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, timeout: float) -> None:
        self._loop = loop
        self._transport = transport
        self._timeout = timeout
        self._since: float | None = None
        self.fired = False
        self._handle: asyncio.TimerHandle | None = loop.call_later(timeout, self._check)

    def waiting(self) -> None:
        self._since = self._loop.time()

    def done(self) -> None:
        self._since = None

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        since = self._since
        now = self._loop.time()
        if since is not None and now - since >= self._timeout:
            self._handle = None
            self.fired = True
            self._transport.abort()  # the handler is cancelled; its replica request is closed with it
            return
        self._handle = self._loop.call_at((since if since is not None else now) + self._timeout, self._check)
