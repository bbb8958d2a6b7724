"""gpud.proxy.upstream: the proxy's HTTP/1.1 client — framing, keep-alive reuse, flow control, timeouts, errors."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gpud.proxy.upstream import (
    HIGH_WATER,
    BrokenResponse,
    ConnectFailed,
    Connection,
    NoResponse,
    Pool,
    ResponseCut,
    UpstreamTimeout,
)

HEAD = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


class FakeTransport(asyncio.Transport):
    """Records what the connection does to its socket; the test plays the replica's bytes in."""

    def __init__(self, protocol: Connection) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = b""
        self.aborted = False
        self.paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.aborted

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def fake_connection(pool: Pool, head_only: bool = False) -> tuple[Connection, FakeTransport]:
    conn = Connection(pool, 1)
    transport = FakeTransport(conn)
    conn.connection_made(transport)
    conn.send(HEAD, None, head_only)
    return conn, transport


async def exchange(pieces: list[bytes], head_only: bool = False) -> tuple[int, dict[str, str], bytes, bool]:
    """Feed a response in pieces: status, headers, body, and whether the connection went back to the pool."""
    pool = Pool(idle_timeout=5)
    conn, transport = fake_connection(pool, head_only)
    for piece in pieces:
        conn.data_received(piece)
    response = await conn.read_head()
    body = await response.read_all()
    response.release()
    await asyncio.sleep(0)
    reused = not transport.aborted and pool._idle.get(1) == [conn]
    return response.status, dict(response.headers), body, reused


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"7\r\ndata: a\r\n1a;ext=1\r\n" + b"x" * 26 + b"\r\n0\r\nTrailer-Field: t\r\n\r\n"
)


def test_chunked_body_decodes_at_every_split_point_and_byte_by_byte() -> None:
    async def main() -> None:
        expected = b"data: a" + b"x" * 26
        for split in range(1, len(CHUNKED)):
            status, headers, body, reused = await exchange([CHUNKED[:split], CHUNKED[split:]])
            assert (status, body, reused) == (200, expected, True), split
        status, headers, body, reused = await exchange([CHUNKED[i : i + 1] for i in range(len(CHUNKED))])
        assert body == expected and reused
        assert headers["Transfer-Encoding"] == "chunked"

    run(main())


def test_content_length_body_and_keep_alive() -> None:
    async def main() -> None:
        raw = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-A:  spaced \r\n\r\nhello"
        for split in range(1, len(raw)):
            status, headers, body, reused = await exchange([raw[:split], raw[split:]])
            assert (status, body, reused) == (201, b"hello", True)
            assert headers["X-A"] == "spaced"

    run(main())


@pytest.mark.parametrize(
    ("raw", "body", "reused"),
    [
        # Framed by the connection closing: read to the end, never reused.
        (b"HTTP/1.1 200 OK\r\n\r\nuntil close", b"until close", False),
        # HTTP/1.0 and Connection: close are not kept alive.
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
        (b"HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
        # No body for 204 and 304, whatever the headers say.
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"", True),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", b"", True),
        # Interim 1xx answers are skipped.
        (
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!",
            b"!",
            True,
        ),
        # Bytes past the declared end: the body is cut at the length and the connection is not trusted again.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", b"ok", False),
    ],
)
def test_framings(raw: bytes, body: bytes, reused: bool) -> None:
    async def main() -> None:
        pool = Pool(idle_timeout=5)
        conn, transport = fake_connection(pool)
        conn.data_received(raw)
        if b"Content-Length" not in raw and b" 204 " not in raw:
            conn.connection_lost(None)  # the replica closes: that ends an until-close body
        response = await conn.read_head()
        assert await response.read_all() == body
        response.release()
        assert (not transport.aborted and not conn.closed) == reused

    run(main())


def test_head_response_keeps_its_content_length_but_has_no_body() -> None:
    async def main() -> None:
        status, headers, body, reused = await exchange(
            [b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"], head_only=True
        )
        assert (status, headers["Content-Length"], body, reused) == (200, "1234", b"", True)

    run(main())


@pytest.mark.parametrize(
    "raw",
    [
        b"SPDY/3 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * 70_000,
    ],
)
def test_malformed_heads_are_broken_responses(raw: bytes) -> None:
    async def main() -> None:
        conn, transport = fake_connection(Pool(idle_timeout=5))
        conn.data_received(raw)
        with pytest.raises(BrokenResponse) as broken:
            await conn.read_head()
        assert not isinstance(broken.value, ResponseCut)  # invalid, not cut: the proxy does not retry it
        assert transport.aborted

    run(main())


@pytest.mark.parametrize("body", [b"zz\r\n", b"0x5\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n"])
def test_malformed_chunks_break_the_body(body: bytes) -> None:
    async def main() -> None:
        conn, transport = fake_connection(Pool(idle_timeout=5))
        conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        response = await conn.read_head()
        with pytest.raises(BrokenResponse):
            await response.read_all()
        response.release()
        assert transport.aborted

    run(main())


def test_a_connection_cut_mid_body_or_mid_head_is_a_cut_and_before_any_byte_is_no_response() -> None:
    async def main() -> None:
        pool = Pool(idle_timeout=5)
        conn, _ = fake_connection(pool)
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        response = await conn.read_head()
        assert await response.read() == b"abc"
        conn.connection_lost(ConnectionResetError("reset"))
        with pytest.raises(ResponseCut):
            await response.read()

        conn, _ = fake_connection(pool)  # framed by close: a reset is not a clean end
        conn.data_received(b"HTTP/1.1 200 OK\r\n\r\npartial")
        response = await conn.read_head()
        conn.connection_lost(ConnectionResetError("reset"))
        with pytest.raises(ResponseCut):
            await response.read_all()

        conn, _ = fake_connection(pool)
        conn.data_received(b"HTTP/1.1 200 OK\r\n")
        conn.connection_lost(None)
        with pytest.raises(ResponseCut):
            await conn.read_head()

        conn, _ = fake_connection(pool)
        conn.connection_lost(None)
        with pytest.raises(NoResponse):
            await conn.read_head()

    run(main())


def test_reading_pauses_while_the_consumer_lags_and_resumes_when_it_reads() -> None:
    async def main() -> None:
        conn, transport = fake_connection(Pool(idle_timeout=5))
        conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        response = await conn.read_head()
        piece = b"x" * 65536
        frame = b"%x\r\n%s\r\n" % (len(piece), piece)
        sent = 0
        while not transport.paused:
            conn.data_received(frame)
            sent += len(piece)
        assert HIGH_WATER < sent <= HIGH_WATER + len(piece)
        assert len(await response.read()) == sent  # everything buffered comes out in one piece
        assert not transport.paused

    run(main())


# -- with real sockets ------------------------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@contextlib.asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[int, list[int]]]:
    """A raw TCP server; the handler gets the connection's ordinal. Yields the port and connection count."""
    count = [0]
    tasks: set[asyncio.Task[None]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count[0] += 1
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await handler(reader, writer, count[0])
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1], count
    finally:
        srv.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await srv.wait_closed()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def request(body: bytes = b"") -> bytes:
    return b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    return await reader.readexactly(length)


def test_keep_alive_reuses_one_connection_and_sends_bodies_whole() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            body = await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    async def main() -> None:
        async with server(handler) as (port, count):
            pool = Pool(idle_timeout=5)
            for body in (b"a", b"b" * 200_000, b""):
                response = await pool.request(port, request(body), body)
                assert await response.read_all() == body
                response.release()
            assert count[0] == 1
            await pool.close()

    run(main())


def test_a_pooled_connection_closed_by_the_replica_is_retried_once_on_a_new_one() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(OK)
        if n == 1:
            await read_request(
                reader
            )  # the second request on the first connection: hang up without answering
            return
        await reader.read()

    async def main() -> None:
        async with server(handler) as (port, count):
            pool = Pool(idle_timeout=5)
            for _ in range(2):
                response = await pool.request(port, request(), b"")
                assert await response.read_all() == b"ok"
                response.release()
            assert count[0] == 2
            await pool.close()

    run(main())


def test_a_fresh_connection_closed_without_answer_is_no_response() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)

    async def main() -> None:
        async with server(handler) as (port, count):
            pool = Pool(idle_timeout=5)
            with pytest.raises(NoResponse):
                await pool.request(port, request(), b"")
            assert count[0] == 1
            await pool.close()

    run(main())


def test_silence_past_the_idle_timeout_raises_and_closes_the_connection() -> None:
    async def main() -> None:
        gone = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" if n == 2 else b"")
            await reader.read()  # returns when the client closes
            gone.set()

        async with server(handler) as (port, _):
            pool = Pool(idle_timeout=0.1)
            with pytest.raises(UpstreamTimeout):
                await pool.request(port, request(), b"")
            await asyncio.wait_for(gone.wait(), 5)
            gone.clear()
            response = await pool.request(port, request(), b"")  # head arrives, then nothing
            with pytest.raises(UpstreamTimeout):
                await response.read()
            response.close()
            await asyncio.wait_for(gone.wait(), 5)
            await pool.close()

    run(main())


def test_a_closed_port_is_connect_failed() -> None:
    async def main() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, not listening: connections are refused
            pool = Pool(idle_timeout=5)
            with pytest.raises(ConnectFailed, match="Cannot connect"):
                await pool.request(port, request(), b"")
            await pool.close()

    run(main())


def test_a_connection_released_with_unread_body_is_not_pooled() -> None:
    # The replica finished while the consumer (a slow client) had not read everything, and the client left:
    # reusing this connection would start the next client's body with these leftover bytes.
    async def main() -> tuple[bool, bool]:
        pool = Pool(idle_timeout=5)
        conn, transport = fake_connection(pool)
        conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        response = await conn.read_head()
        assert await response.read() == b"first"
        conn.data_received(b"6\r\nsecond\r\n0\r\n\r\n")  # complete, but "second" is never read
        response.release()
        await asyncio.sleep(0)
        return transport.aborted, pool._idle.get(1) == [conn]

    aborted, pooled = run(main())
    assert aborted and not pooled
