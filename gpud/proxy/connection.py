"""One client connection to the proxy: requests parsed by httptools (llhttp), answered one at a time.

The protocol reads whole requests (the body too: the proxy routes by it and may retry it elsewhere), hands
each to the proxy's handler as a task, and gives the handler what it needs to answer: `write` (also the
sink a replica's body is relayed into) and flow control — when the client stops reading, the replica's
connection stops being read (`pause_writing` → `upstream.pause_reading`).

Slow and stuck clients (nginx's client_header_timeout, client_body_timeout and send_timeout), with one timer
per connection that is re-armed only when it fires early:

* a request head must arrive within `client_timeout` of the connection opening or of the previous answer
  (a client trickling header bytes is cut, also on a kept-alive connection);
* a body must keep coming: no progress for `client_timeout` cuts it;
* a client that leaves answer bytes unread for `client_timeout` (the socket buffer full) is cut, so that no
  request holds its replica and its buffers forever.

A client that goes away cancels its request's task, which closes the connection to the replica, which then
stops generating. Malformed requests get a 4xx and one debug line at most, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import httptools

from gpud.proxy.message import error_response

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024
MAX_HEADERS = 128
# After refusing a request whose body is still coming (413), read and drop what the client sends until it
# closes, goes quiet this long, or this much time has passed, then close: closing with unread bytes makes the
# kernel answer with a reset, which would throw away the 413 before the client reads it (nginx's
# lingering_close, lingering_timeout and lingering_time).
LINGER_QUIET_SEC = 5.0
LINGER_MAX_SEC = 30.0
_PIPELINE_LIMIT = 16  # requests queued behind the one in flight before reading pauses

# What the one timer of a connection is waiting for.
_NOTHING, _HEAD, _BODY, _WRITE = 0, 1, 2, 3


class _StopParsing(Exception):
    """Raised from a parser callback after a refusal; httptools ends the parse (HttpParserCallbackError)."""


@dataclass
class Request:
    """A whole request as it came off the wire (names and values as bytes; the target not decoded)."""

    method: bytes = b""
    target: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    http11: bool = True
    keep_alive: bool = True
    # The first value of each field by its lower-case name, built once when the head is complete.
    fields: dict[bytes, bytes] = field(default_factory=dict)

    def header(self, lower_name: bytes) -> bytes | None:
        """The first value of a field (its name given in lower case), else None."""
        return self.fields.get(lower_name)


class Upstream(Protocol):
    """What a relayed response's source must offer to be paused and resumed."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Hooks(Protocol):
    """What the connection needs from the proxy it serves."""

    client_timeout: float
    max_body: int

    def handle(self, conn: ClientConnection, request: Request) -> Coroutine[Any, Any, None]: ...

    def closed(self, conn: ClientConnection) -> None: ...

    def client_timed_out(self) -> None: ...

    def rejected(self, status: int, kind: str) -> None: ...


class ClientConnection(asyncio.Protocol):
    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.remote = b""
        self.gone = False
        self.upstream: Upstream | None = None  # the replica connection whose body is being relayed here
        self._parser = httptools.HttpRequestParser(self)
        self._request = Request()
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_size = 0
        self._queue: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._write_paused = False
        self._refusing = False  # an error answer is due or out; nothing more is parsed or forwarded
        self._refusal = b""  # that answer, written once the request in flight (if any) is answered
        self._answering = False  # some bytes of the answer to the request in flight are written
        self._linger_quiet_until = 0.0
        self._linger_end = 0.0
        self._waiting = _NOTHING
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]).encode() if peer else b""
        self._wait_for(_HEAD)

    def data_received(self, data: bytes) -> None:
        if self._refusing:
            self._linger_quiet_until = self.loop.time() + LINGER_QUIET_SEC  # dropped unread, on purpose
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._task is not None:  # the upgrading request itself is being answered: no second answer
                self._refusing, self._refusal = True, b""
                self._queue.clear()
                return
            self._refuse(400, "Protocol upgrades and CONNECT are not supported by the gpud proxy.", "unsupported",
                         "bad_request")
        except httptools.HttpParserError as exc:  # also a callback's _StopParsing (a CallbackError)
            if self._refusing:  # a callback refused the request and stopped the parse: answered already
                return
            log.debug("malformed request from %s: %s", self.remote.decode(), exc)
            self._refuse(400, "The request is not valid HTTP/1.1.", "invalid_request", "bad_request")

    def eof_received(self) -> bool:
        return False  # a client that closes its side has gone (as aiohttp treats it): close ours

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._stop_timer()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.upstream is not None and self._write_paused:
            self.upstream.resume_reading()  # let the cancelled relay see its end
        self.hooks.closed(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()
        self._wait_for(_WRITE)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._waiting == _WRITE:
            self._wait_for(_NOTHING)
        if self.upstream is not None:
            self.upstream.resume_reading()

    # -- httptools callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._request = Request()
        self._body = []
        self._body_size = self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._request.target += url
        self._grow_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._request.headers
        headers.append((name, value))
        self._grow_head(len(name) + len(value) + 4)
        if len(headers) > MAX_HEADERS:
            self._stop_parsing(431, f"The request has more than {MAX_HEADERS} header fields.", "headers_too_large",
                               "bad_request")

    def on_headers_complete(self) -> None:
        parser, request = self._parser, self._request
        fields = request.fields
        for name, value in reversed(request.headers):  # the first occurrence wins
            fields[name.lower()] = value
        request.method = parser.get_method()
        request.http11 = parser.get_http_version() == "1.1"
        request.keep_alive = parser.should_keep_alive()
        length = request.header(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.hooks.max_body:
            self._too_large()
        expect = request.header(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._wait_for(_BODY)

    def on_body(self, data: bytes) -> None:
        self._body_size += len(data)
        if self._body_size > self.hooks.max_body:  # no Content-Length (chunked): the limit applies while reading
            self._too_large()
        self._body.append(data)
        self._deadline = self.loop.time() + self.hooks.client_timeout  # progress

    def on_message_complete(self) -> None:
        request = self._request
        body = self._body
        request.body = body[0] if len(body) == 1 else b"".join(body)
        self._body = []
        self._wait_for(_NOTHING)
        if self._task is None:
            self._start(request)
        else:
            self._queue.append(request)
            if len(self._queue) >= _PIPELINE_LIMIT and self.transport is not None:
                self.transport.pause_reading()

    # -- answering -------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.gone:
            self._answering = True
            self.transport.write(data)

    def finish(self, keep_alive: bool) -> None:
        """The answer to the request in flight is complete."""
        self._task = None
        self.upstream = None
        if self.gone or self.transport is None:
            return
        if self._refusing:
            self._send_refusal()
            return
        if not keep_alive:
            self.transport.close()  # flushes what is buffered first
            self.gone = True
            return
        if self._queue:
            if len(self._queue) == _PIPELINE_LIMIT:
                self.transport.resume_reading()
            self._start(self._queue.popleft())
        else:
            self._wait_for(_HEAD)

    def abort(self) -> None:
        if self.transport is not None and not self.gone:
            self.transport.abort()

    def _start(self, request: Request) -> None:
        self._answering = False
        self._task = self.loop.create_task(self._run(request))

    async def _run(self, request: Request) -> None:
        try:
            await self.hooks.handle(self, request)
        except asyncio.CancelledError:
            pass  # the client went away
        except Exception:  # a bug must not leave the client hanging: answer, and say so once in the log
            log.exception("the proxy failed on %s %s", request.method.decode("latin-1"),
                          request.target[:200].decode("latin-1"))
            if self._answering:  # part of an answer is out: a 500 now would be read as its rest
                self.abort()
                return
            self.write(error_response(500, "The gpud proxy hit an internal error.", "server_error", "internal_error",
                                      keep_alive=False))
            self.finish(False)

    def _grow_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEAD:
            self._stop_parsing(431, f"The request head is over {MAX_HEAD // 1024} KiB.", "headers_too_large",
                               "bad_request")

    def _too_large(self) -> NoReturn:
        self._stop_parsing(413, f"The request body is larger than the proxy's limit of {self.hooks.max_body} bytes.",
                           "request_too_large", "too_large")

    def _stop_parsing(self, status: int, message: str, code: str, kind: str) -> NoReturn:
        """From a parser callback: refuse the request, and end the parse of this read there (llhttp would go
        on with the rest of its bytes, and a refused request must never be handled)."""
        self._refuse(status, message, code, kind)
        raise _StopParsing

    def _refuse(self, status: int, message: str, code: str, kind: str) -> None:
        """Answer a request that cannot be read (or is too large to read) and close the connection."""
        if self._refusing:
            return
        self._refusing = True
        self.hooks.rejected(status, kind)
        self._wait_for(_NOTHING)
        self._refusal = error_response(status, message, "invalid_request_error", code, keep_alive=False)
        self._queue.clear()
        if self._task is None:  # else the one in flight is answered first (see finish)
            self._send_refusal()

    def _send_refusal(self) -> None:
        """Write the refusal, close our side for writing, and drop what the client still sends for a while
        (see LINGER_QUIET_SEC) before closing."""
        transport = self.transport
        if transport is None or self.gone:
            return
        transport.write(self._refusal)
        self.gone = True  # nothing more is written to this client
        try:
            if not transport.can_write_eof():
                raise OSError("no half-close on this transport")
            transport.write_eof()
        except OSError:  # the client is gone already, or the transport cannot half-close: just close
            transport.close()
            return
        now = self.loop.time()
        self._linger_quiet_until, self._linger_end = now + LINGER_QUIET_SEC, now + LINGER_MAX_SEC
        self.loop.call_at(self._linger_quiet_until, self._linger)

    def _linger(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        now = self.loop.time()
        if now >= self._linger_quiet_until or now >= self._linger_end:
            transport.close()
            return
        self.loop.call_at(min(self._linger_quiet_until, self._linger_end), self._linger)

    # -- the one timer ---------------------------------------------------------------------------------

    def _wait_for(self, what: int) -> None:
        self._waiting = what
        if what == _NOTHING:
            return
        self._deadline = self.loop.time() + self.hooks.client_timeout
        if self._timer is None:
            self._timer = self.loop.call_at(self._deadline, self._check)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self._waiting == _NOTHING or self.gone:
            return
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._check)
            return
        self.hooks.client_timed_out()
        self.abort()

