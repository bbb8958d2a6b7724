"""A small HTTP/1.1 client for the proxy's last hop: gpud → a replica listening on 127.0.0.1.

Why not aiohttp's ClientSession: profiling the proxy under wrk put about 40 % of its CPU in the generic
client (request objects, automatic headers, payload registry, cookie and tracing hooks). This hop is narrow —
plain HTTP to loopback ports of servers gpud started itself — so a client that writes one request head and
parses one response head per request does the same job for a fraction of the cost.

Scope: HTTP/1.1 keep-alive with a LIFO pool per port (idle connections are dropped after `keepalive_sec`,
below uvicorn's 5 s, so a connection the replica is about to close is not reused); request bodies given
whole (the proxy has buffered them); responses framed by Content-Length, chunked encoding or connection
close; bodies delivered as they arrive, with flow control (reading pauses while more than HIGH_WATER bytes
wait for the consumer) and an idle timeout on every wait for the replica.

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
import collections
import re

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
MAX_HEAD = 64 * 1024
KEEPALIVE_SEC = 4.0
_SMALL_WRITE = 64 * 1024
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")

# Exchange states of a connection.
_IDLE, _HEAD, _BODY = 0, 1, 2
# Body framings.
_NONE, _LENGTH, _CHUNKED, _UNTIL_CLOSE = 0, 1, 2, 3
# Chunked-decoder states.
_SIZE, _DATA, _DATA_END, _TRAILER = 0, 1, 2, 3


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


class Response:
    """A response head, and the body as it arrives. Call `release()` or `close()` when done with it."""

    __slots__ = ("status", "reason", "headers", "content_length", "_conn")

    def __init__(
        self,
        conn: Connection,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        content_length: int | None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # as sent, in order, duplicates kept
        self.content_length = content_length
        self._conn = conn

    async def read(self) -> bytes:
        """Everything received since the last call (waiting for something), b"" at the end of the body."""
        return await self._conn.read_body()

    async def read_all(self) -> bytes:
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Back to the pool when the body was read to its end on a keep-alive connection, else closed."""
        self._conn.finish()

    def close(self) -> None:
        """Drop the connection now (the replica sees it close and can stop working on the request)."""
        self._conn.abort()


class Connection(asyncio.Protocol):
    """One keep-alive connection to a replica, carrying one exchange at a time."""

    def __init__(self, pool: Pool, port: int) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.port = port
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._state = _IDLE
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        self._response: Response | None = None
        self._head = bytearray()
        self._got_bytes = False
        self._head_only = False
        self._keep_alive = True
        self._framing = _NONE
        self._remaining = 0
        self._chunk_state = _SIZE
        self._line = bytearray()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._complete = False

    # -- asyncio.Protocol ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._pool.track(self)

    def data_received(self, data: bytes) -> None:
        if self._state == _BODY:
            self._feed(data)
        elif self._state == _HEAD:
            self._got_bytes = True
            self._head += data
            self._parse_head()
        else:  # bytes nobody asked for: this connection's framing cannot be trusted any more
            self.abort()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost settles the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self._state == _HEAD:
            why = f" ({exc})" if exc else ""
            if self._got_bytes:
                self._fail(
                    ResponseCut(
                        f"The replica on port {self.port} closed the connection in the middle "
                        f"of the response head{why}."
                    )
                )
            else:
                self._fail(
                    NoResponse(
                        f"The replica on port {self.port} closed the connection before answering{why}."
                    )
                )
        elif self._state == _BODY and not self._complete:
            if self._framing == _UNTIL_CLOSE and exc is None:  # a clean close is this body's end
                self._keep_alive = False
                self._body_complete()
            else:
                self._fail(
                    ResponseCut(
                        f"The replica on port {self.port} closed the connection before the "
                        "end of the response body."
                    )
                )

    # -- one exchange ----------------------------------------------------------------------------------

    def send(self, head: bytes, body: bytes | None, head_only: bool) -> None:
        self._state = _HEAD
        self._head_only = head_only
        transport = self._transport
        assert transport is not None
        if not body:
            transport.write(head)
        elif len(body) <= _SMALL_WRITE:
            transport.write(head + body)  # one segment for the usual small JSON request
        else:
            transport.write(head)
            transport.write(body)

    async def read_head(self) -> Response:
        while self._response is None:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._response

    async def read_body(self) -> bytes:
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._paused and self._transport is not None:
                    self._paused = False
                    self._transport.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait()

    def finish(self) -> None:
        # Pooled only when the whole body was consumed: unread bytes would become the start of the next
        # client's response (a slow client that leaves after the replica finished leaves them behind).
        if self._chunks or not (self._complete and self._keep_alive and self._error is None and not self.closed):
            self.abort()
            return
        self._state = _IDLE
        self._response = None
        self._head_only = False
        self._remaining = 0
        self._got_bytes = False
        self._complete = False
        self._framing = _NONE
        self._chunk_state = _SIZE
        self.idle_since = self._loop.time()
        self._pool.release(self)

    def abort(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.abort()
        self.closed = True
        self._keep_alive = False

    # -- waiting ---------------------------------------------------------------------------------------

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(self._pool.idle_timeout, self._time_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _time_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(
                UpstreamTimeout(
                    f"The replica on port {self.port} sent nothing for {self._pool.idle_timeout:g} s."
                )
            )

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self._keep_alive = False
        self._wake()

    # -- parsing ---------------------------------------------------------------------------------------

    def _parse_head(self) -> None:
        while True:
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_HEAD:
                    self._broken("a response head over 64 KiB")
                return
            raw = bytes(self._head[:end])
            rest = bytes(self._head[end + 4 :])
            self._head.clear()
            try:
                version, status, reason, headers = _parse_head(raw)
            except ValueError:
                self._broken("a malformed response head")
                return
            if 100 <= status < 200 and status != 101:  # interim answer (e.g. 103): the real one follows
                self._head += rest
                continue
            break
        length: int | None = None
        te = conn = ""
        lengths = set()
        for name, value in headers:
            lower = name.lower()
            if lower == "content-length":
                lengths.add(value)
            elif lower == "transfer-encoding":
                te = f"{te},{value}" if te else value
            elif lower == "connection":
                conn = f"{conn},{value}" if conn else value
        # isascii(): str.isdigit() also accepts digits such as "²" that int() refuses.
        if len(lengths) > 1 or any(not (v.isascii() and v.isdigit()) for v in lengths):
            self._broken("an invalid Content-Length")
            return
        if lengths:
            length = int(next(iter(lengths)))
        self._keep_alive = version == "HTTP/1.1" and "close" not in conn.lower()
        if self._head_only or status in (204, 304):
            self._framing = _NONE
        elif status == 101:  # a protocol switch cannot go through this client
            self._broken("an attempt to switch protocols")
            return
        elif te:
            length = None
            if te.rsplit(",", 1)[-1].strip().lower() == "chunked":
                self._framing = _CHUNKED
            else:
                self._framing = _UNTIL_CLOSE
                self._keep_alive = False
        elif length is not None:
            self._framing = _LENGTH
            self._remaining = length
        else:
            self._framing = _UNTIL_CLOSE
            self._keep_alive = False
        self._state = _BODY
        self._response = Response(self, status, reason, headers, length)
        if self._framing == _NONE or (self._framing == _LENGTH and length == 0):
            self._body_complete()
        self._wake()
        if rest:
            self._feed(rest)

    def _broken(self, what: str) -> None:
        self._fail(BrokenResponse(f"The replica on port {self.port} sent {what}."))
        self.abort()

    def _feed(self, data: bytes) -> None:
        framing = self._framing
        if self._complete:
            self.abort()  # bytes after the end of the response: do not reuse this connection
        elif framing == _LENGTH:
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                self._push(data)
            else:
                self._remaining = 0
                self._push(data if len(data) == remaining else data[:remaining])
                self._body_complete()
                if len(data) > remaining:
                    self.abort()
        elif framing == _CHUNKED:
            self._feed_chunked(data)
        else:
            self._push(data)

    def _feed_chunked(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._chunk_state == _DATA:
                take = min(self._remaining, end - pos)
                self._push(data if pos == 0 and take == end else data[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._chunk_state = _DATA_END
                continue
            eol = data.find(b"\n", pos)
            if eol < 0:
                self._line += data[pos:]
                if len(self._line) > 8192:
                    self._broken("a chunk-size line over 8 KiB")
                return
            if self._line:
                line = bytes(self._line + data[pos:eol])
                self._line.clear()
            else:
                line = data[pos:eol]
            pos = eol + 1
            line = line.rstrip(b"\r")
            state = self._chunk_state
            if state == _SIZE:
                size = line.split(b";", 1)[0].strip()
                if not _HEX.fullmatch(size):
                    self._broken("an invalid chunk size")
                    return
                self._remaining = int(size, 16)
                self._chunk_state = _DATA if self._remaining else _TRAILER
            elif state == _DATA_END:
                if line:
                    self._broken("a chunk without its closing CRLF")
                    return
                self._chunk_state = _SIZE
            elif not line:  # _TRAILER: an empty line ends the body (trailer fields are dropped)
                self._body_complete()
                if pos < end:
                    self.abort()
                return

    def _push(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def _body_complete(self) -> None:
        self._complete = True
        self._wake()


def _parse_head(raw: bytes) -> tuple[str, int, str, list[tuple[str, str]]]:
    lines = raw.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise ValueError("status line")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1:] in b" \t" or line[:1] in b" \t":
            raise ValueError("header line")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("utf-8", "replace")))
    return version.decode(), int(code), reason.decode("latin-1"), headers


class Pool:
    """Keep-alive connections to replica ports on 127.0.0.1, reused most-recently-released first."""

    def __init__(
        self, *, idle_timeout: float, connect_timeout: float = 10.0, keepalive_sec: float = KEEPALIVE_SEC
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive_sec
        self._idle: dict[int, list[Connection]] = {}
        self._all: set[Connection] = set()

    async def request(
        self, port: int, head: bytes, body: bytes | None, *, head_only: bool = False
    ) -> Response:
        """Send one request (`head`: its complete head, blank line included); wait for the answer's head.

        A pooled connection that turns out closed before any response byte (the replica closed it while it
        sat idle) is retried once on a new connection; any other failure is raised for the caller to judge.
        """
        for attempt in (0, 1):
            conn, reused = await self._acquire(port, fresh=attempt > 0)
            try:
                conn.send(head, body, head_only)
                return await conn.read_head()
            except NoResponse:
                if reused and attempt == 0:
                    continue
                raise
            except BaseException:
                conn.abort()  # a timeout or a cancelled caller: the replica sees the connection close
                raise
        raise AssertionError("unreachable")

    async def _acquire(self, port: int, fresh: bool) -> tuple[Connection, bool]:
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
                self.loop.create_connection(lambda: Connection(self, port), "127.0.0.1", port),
                self._connect_timeout,
            )
        except asyncio.TimeoutError:
            raise ConnectFailed(f"Connecting to 127.0.0.1:{port} timed out.") from None
        except OSError as exc:
            raise ConnectFailed(f"Cannot connect to 127.0.0.1:{port}: {exc.strerror or exc}.") from None
        return conn, False

    def track(self, conn: Connection) -> None:
        self._all.add(conn)

    def release(self, conn: Connection) -> None:
        idle = self._idle.setdefault(conn.port, [])
        idle.append(conn)
        # LIFO reuse leaves the oldest at the bottom; expire it here so unused connections do not pile up.
        if len(idle) > 1 and conn.idle_since - idle[0].idle_since >= self._keepalive:
            idle.pop(0).abort()

    def forget(self, conn: Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.port)
        if idle and conn in idle:
            idle.remove(conn)

    async def close(self) -> None:
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost and close their sockets
