"""The proxy's last hop: keep-alive HTTP/1.1 connections to replicas on 127.0.0.1, with bodies relayed as bytes.

Why not a general HTTP client: this hop is narrow (plain HTTP to loopback ports of servers gpud started
itself), and it is the hot path. A request goes out as one write (head and body); the response head is
parsed here from bytes (only the fields that decide framing are looked at); the body is not decoded: the
bytes that arrive are handed on as they are (a chunked stream stays chunked: gpud.proxy.chunked only walks
its framing to find where it ends), so a streamed token costs one write per read, not a decode and an encode.
Nothing past the end of a body is ever handed on.

One exchange at a time per connection:

    conn.send(head, body, head_only=…, decode=…)
    head = await conn.response()   # the head, once the first body bytes (or the end) arrived too
    conn.first                     # those first bytes, held back: nothing has gone to the client yet
    await conn.relay(sink)         # the rest goes to sink.write(data) as it arrives; done at the end
    conn.release()                 # back to the pool if the body ended cleanly, else closed

Holding the first bytes back lets the proxy retry a replica that dies before its first token. Flow control:
the sink pauses and resumes the connection's reading (`pause_reading`/`resume_reading`), so a slow client
slows the replica down and nothing piles up in between. `decode=True` (for an HTTP/1.0 client, which cannot
take chunked encoding) hands on the decoded data instead.

Errors tell the proxy what it may do next:

    ConnectFailed    no connection could be made: nothing reached the replica
    NoResponse       the connection closed before any response byte
    UpstreamTimeout  the replica sent nothing for `idle_timeout` seconds
    BrokenResponse   the response started, then broke off, or is not valid HTTP
      ResponseCut      (a BrokenResponse) the connection closed in the middle of the response: the
                       replica died or dropped it, as opposed to sending something invalid
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gpud.proxy.chunked import ChunkScanner, Malformed

MAX_HEAD = 64 * 1024
# A response with a Content-Length up to this size is read whole before anything reaches the client: one
# write, and a replica that dies in the middle of it costs the client nothing (it is retried elsewhere).
WHOLE_LIMIT = 256 * 1024
KEEPALIVE_SEC = 4.0  # below uvicorn's 5 s: a connection the replica is about to close is not reused
_SMALL_WRITE = 64 * 1024


class Framing(enum.Enum):
    """How the response body ends."""

    NONE = 0  # no body (HEAD, 204, 304)
    LENGTH = 1  # Content-Length
    CHUNKED = 2  # Transfer-Encoding: chunked
    CLOSE = 3  # until the connection closes


class UpstreamError(Exception):
    """Base of the errors below; the message is one sentence about what happened on the connection."""


class ConnectFailed(UpstreamError):
    pass


class NoResponse(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    pass


class BrokenResponse(UpstreamError):
    pass


class ResponseCut(BrokenResponse):
    pass


class Sink(Protocol):
    """Where a relayed body goes (the client connection)."""

    def write(self, data: bytes) -> None: ...


@dataclass(frozen=True)
class ResponseHead:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]  # as sent, in order, duplicates kept
    framing: Framing
    content_length: int | None


# Exchange states of a connection.
_IDLE, _HEAD, _BODY, _DONE = 0, 1, 2, 3


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a replica, carrying one exchange at a time."""

    def __init__(self, pool: Pool, port: int) -> None:
        self.pool = pool
        self.port = port
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.first = b""  # body bytes received before relay() (held back from the client)
        self.last = b""  # the last bytes handed to the sink (the cut rule looks at how they end)
        self._reset()

    def _reset(self) -> None:
        self._state = _IDLE
        self._head_buf = bytearray()
        self._head: ResponseHead | None = None
        self._head_only = False
        self._decode = False
        self._scanner: ChunkScanner | None = None
        self._remaining = 0  # of a Content-Length body
        self._keep_alive = True
        self._complete = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Sink | None = None
        self._held: list[bytes] = []
        self._activity = 0.0
        self.first = b""
        self.last = b""

    @property
    def in_chunk(self) -> bool:
        """The body relayed so far ends inside a chunk (an SSE error event may only go between chunks)."""
        return self._scanner is not None and not self._scanner.between_chunks

    # -- asyncio.Protocol ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pool.track(self)

    def data_received(self, data: bytes) -> None:
        self._activity = self._loop.time()
        state = self._state
        if state == _BODY:
            self._feed_body(data)
        elif state == _HEAD:
            self._head_buf += data
            self._parse_head()
        else:  # bytes nobody asked for: this connection's framing cannot be trusted any more
            self.abort()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost settles the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        self.pool.unwatch(self)
        why = f" ({exc})" if exc else ""
        if self._state == _HEAD:
            if self._head_buf:
                self._fail(ResponseCut(f"The replica on port {self.port} closed the connection in the middle "
                                       f"of the response head{why}."))
            else:
                self._fail(NoResponse(f"The replica on port {self.port} closed the connection before "
                                      f"answering{why}."))
        elif self._state == _BODY and not self._complete:
            assert self._head is not None
            if self._head.framing is Framing.CLOSE and exc is None:  # a clean close is this body's end
                self._keep_alive = False
                self._body_complete()
            else:
                self._fail(ResponseCut(f"The replica on port {self.port} closed the connection before the end "
                                       "of the response body."))

    # -- one exchange ----------------------------------------------------------------------------------

    def send(self, head: bytes, body: bytes, *, head_only: bool = False, decode: bool = False) -> None:
        """Start an exchange: `head` is the complete request head (blank line included)."""
        self._reset()
        self._state = _HEAD
        self._head_only = head_only
        self._decode = decode
        self._activity = self._loop.time()
        self.pool.watch(self)
        transport = self.transport
        assert transport is not None
        if body and len(body) > _SMALL_WRITE:
            transport.writelines((head, body))
        else:
            transport.write(head + body if body else head)  # one segment for the usual small JSON request

    async def response(self) -> ResponseHead:
        """The response head, once the first body bytes (a small body: all of it) or its end arrived too."""
        while True:
            head = self._head
            if head is not None and (self._complete or self._held and not (
                    head.framing is Framing.LENGTH and (head.content_length or 0) <= WHOLE_LIMIT)):
                break
            if self._error is not None:
                raise self._error
            await self._wait()
        if self._error is not None and not self._held:
            raise self._error
        self.first = b"".join(self._held) if len(self._held) != 1 else self._held[0]
        self._held = []
        return head

    @property
    def complete(self) -> bool:
        return self._complete

    async def relay(self, sink: Sink) -> None:
        """Hand the rest of the body to `sink` as it arrives; returns at its end, raises if it breaks off."""
        self._sink = sink
        held, self._held = self._held, []
        for data in held:  # arrived between response() and now
            self._push(data)
        while not self._complete:
            if self._error is not None:
                raise self._error
            await self._wait()
        if self._error is not None:
            raise self._error

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
            self._activity = self._loop.time()  # the replica's silence while we held it back is not its fault

    def release(self) -> None:
        """Back to the pool when the body ended on a keep-alive connection, else closed."""
        if not (self._complete and self._keep_alive and self._error is None and not self.closed
                and not self._held):
            self.abort()
            return
        self._state = _IDLE
        self._sink = None
        self.idle_since = self._loop.time()
        self.pool.release(self)

    def abort(self) -> None:
        """Drop the connection now (the replica sees it close and can stop working on the request)."""
        self.pool.unwatch(self)
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True
        self._keep_alive = False

    # -- waiting and the idle timeout ------------------------------------------------------------------

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self._keep_alive = False
        self._wake()

    def check_idle(self, now: float) -> None:
        """The pool's sweep: fail the exchange when the replica has sent nothing for the idle timeout."""
        if self._state not in (_HEAD, _BODY) or self._complete:
            self.pool.unwatch(self)
            return
        if self.transport is not None and not self.transport.is_reading():
            self._activity = now  # paused for a slow client: not the replica's silence
            return
        if now - self._activity >= self.pool.idle_timeout:
            self._fail(UpstreamTimeout(f"The replica on port {self.port} sent nothing for "
                                       f"{self.pool.idle_timeout:g} s."))
            self.abort()

    # -- parsing ---------------------------------------------------------------------------------------

    def _parse_head(self) -> None:
        buf = self._head_buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._broken(f"a response head over {MAX_HEAD // 1024} KiB")
                return
            # An interim answer (100 Continue, 103 Early Hints) precedes the real one: skip it.
            if buf[9:10] == b"1" and buf[9:12] != b"101":
                del buf[: end + 4]
                continue
            break
        raw = bytes(buf[: end + 4])
        rest = bytes(buf[end + 4 :])
        self._head_buf = bytearray()
        try:
            head, keep_alive = _parse_response_head(raw, self._head_only)
        except ValueError as exc:
            self._broken(f"a malformed response head ({exc})")
            return
        self._head = head
        self._keep_alive = keep_alive
        self._state = _BODY
        if head.framing is Framing.NONE or (head.framing is Framing.LENGTH and head.content_length == 0):
            self._body_complete()
        elif head.framing is Framing.LENGTH:
            self._remaining = head.content_length or 0
        elif head.framing is Framing.CHUNKED:
            self._scanner = ChunkScanner(decode=self._decode)
        if rest:
            self._feed_body(rest)
        else:
            self._wake()

    def _feed_body(self, data: bytes) -> None:
        if self._complete:
            self.abort()  # bytes after the end of the response: do not reuse this connection
            return
        scanner = self._scanner
        if scanner is not None:
            try:
                used = scanner.feed(data)
            except Malformed as exc:
                self._broken(f"a malformed chunked body ({exc})")
                return
            if used < len(data):
                self._keep_alive = False  # bytes past the end: the connection's framing is not to be trusted
            if scanner.decoded is not None:
                if scanner.decoded:
                    self._push(b"".join(scanner.decoded))
                    scanner.decoded.clear()
            else:
                self._push(data if used == len(data) else data[:used])
            if scanner.done:
                self._body_complete()
            return
        assert self._head is not None
        if self._head.framing is Framing.LENGTH:
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                self._push(data)
                return
            if len(data) > remaining:
                self._keep_alive = False
                data = data[:remaining]
            self._remaining = 0
            self._push(data)
            self._body_complete()
            return
        self._push(data)  # framed by the connection's close

    def _push(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink.write(data)
            self.last = data
        else:
            self._held.append(data)
            self._wake()

    def _broken(self, what: str) -> None:
        self._fail(BrokenResponse(f"The replica on port {self.port} sent {what}."))
        self.abort()

    def _body_complete(self) -> None:
        self._complete = True
        self._state = _DONE
        self.pool.unwatch(self)
        self._wake()


def _parse_response_head(raw: bytes, head_only: bool) -> tuple[ResponseHead, bool]:
    """Status, headers and framing of a response head (bytes up to and including the blank line)."""
    lines = raw[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise ValueError("status line")
    status = int(code)
    headers: list[tuple[bytes, bytes]] = []
    lengths: set[bytes] = set()
    chunked = other_coding = close = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1:] in b" \t" or line[:1] in b" \t":
            raise ValueError("header line")
        value = value.strip(b" \t")
        headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            lengths.add(value)
        elif lower == b"transfer-encoding":
            codings = [c.strip().lower() for c in value.split(b",")]
            chunked = codings[-1:] == [b"chunked"]
            other_coding = not chunked
        elif lower == b"connection":
            close = close or b"close" in value.lower()
    keep_alive = version == b"HTTP/1.1" and not close
    length: int | None = None
    if len(lengths) > 1 or any(not v.isdigit() for v in lengths):
        raise ValueError("Content-Length")
    if lengths:
        length = int(next(iter(lengths)))
    if status == 101:
        raise ValueError("an attempt to switch protocols")
    if head_only or status in (204, 304):
        framing = Framing.NONE
    elif chunked:
        framing, length = Framing.CHUNKED, None
    elif other_coding:
        framing, length, keep_alive = Framing.CLOSE, None, False
    elif length is not None:
        framing = Framing.LENGTH
    else:
        framing, keep_alive = Framing.CLOSE, False
    return ResponseHead(status, reason, headers, framing, length), keep_alive


class Pool:
    """Keep-alive connections to replica ports on 127.0.0.1, reused most-recently-released first."""

    def __init__(self, *, idle_timeout: float, connect_timeout: float = 10.0,
                 keepalive_sec: float = KEEPALIVE_SEC) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive_sec
        self._idle: dict[int, list[UpstreamConnection]] = {}
        self._all: set[UpstreamConnection] = set()
        # Exchanges waiting on a replica, checked for silence by one sweep rather than a timer each: a fired
        # timeout may come up to a quarter of idle_timeout late, and a request costs no timer.
        self._active: set[UpstreamConnection] = set()
        self._sweep_every = max(0.01, min(1.0, idle_timeout / 4))
        self._sweeper: asyncio.TimerHandle | None = None
        self._factory: Callable[[int], Callable[[], UpstreamConnection]] = \
            lambda port: lambda: UpstreamConnection(self, port)

    async def request(self, port: int, head: bytes, body: bytes, *, head_only: bool = False,
                      decode: bool = False) -> tuple[UpstreamConnection, ResponseHead]:
        """Send one request; wait for the answer's head (and its first body bytes).

        A pooled connection that turns out closed before any response byte (the replica closed it while it
        sat idle) is retried once on a new connection; any other failure is raised for the caller to judge.
        """
        for attempt in (0, 1):
            conn, reused = await self._acquire(port, fresh=attempt > 0)
            try:
                conn.send(head, body, head_only=head_only, decode=decode)
                return conn, await conn.response()
            except NoResponse:
                conn.abort()
                if reused and attempt == 0:
                    continue
                raise
            except BaseException:
                conn.abort()  # a timeout or a cancelled caller: the replica sees the connection close
                raise
        raise AssertionError("unreachable")

    async def _acquire(self, port: int, fresh: bool) -> tuple[UpstreamConnection, bool]:
        idle = self._idle.get(port)
        if idle and not fresh:
            now = self.loop.time()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < self._keepalive:
                    return conn, True
                conn.abort()
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(self._factory(port), "127.0.0.1", port), self._connect_timeout)
        except asyncio.TimeoutError:
            raise ConnectFailed(f"Connecting to 127.0.0.1:{port} timed out.") from None
        except OSError as exc:
            raise ConnectFailed(f"Cannot connect to 127.0.0.1:{port}: {exc.strerror or exc}.") from None
        return conn, False

    def track(self, conn: UpstreamConnection) -> None:
        self._all.add(conn)

    def watch(self, conn: UpstreamConnection) -> None:
        self._active.add(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    def unwatch(self, conn: UpstreamConnection) -> None:
        self._active.discard(conn)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        for conn in list(self._active):
            conn.check_idle(now)
        if self._active:
            self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    def release(self, conn: UpstreamConnection) -> None:
        idle = self._idle.setdefault(conn.port, [])
        idle.append(conn)
        # LIFO reuse leaves the oldest at the bottom; expire it here so unused connections do not pile up.
        while len(idle) > 1 and conn.idle_since - idle[0].idle_since >= self._keepalive:
            idle.pop(0).abort()

    def forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.port)
        if idle and conn in idle:
            idle.remove(conn)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost and close their sockets
