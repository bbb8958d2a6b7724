"""gpud.proxy.upstream: the proxy's last hop — framing, raw relay, keep-alive reuse, flow control, timeouts, errors."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gpud.proxy.upstream import (
    WHOLE_LIMIT,
    BrokenResponse,
    ConnectFailed,
    Framing,
    NoResponse,
    Pool,
    ResponseCut,
    UpstreamConnection,
    UpstreamTimeout,
)

HEAD = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


class FakeTransport(asyncio.Transport):
    """Records what the connection does to its socket; the test plays the replica's bytes in."""

    def __init__(self, protocol: UpstreamConnection) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = b""
        self.aborted = False
        self.paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def writelines(self, data: Any) -> None:
        for piece in data:
            self.write(piece)

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.aborted

    def is_reading(self) -> bool:
        return not self.paused

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class Sink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def fake_connection(pool: Pool, head_only: bool = False, decode: bool = False
                    ) -> tuple[UpstreamConnection, FakeTransport]:
    conn = UpstreamConnection(pool, 1)
    transport = FakeTransport(conn)
    conn.connection_made(transport)
    conn.send(HEAD, b"", head_only=head_only, decode=decode)
    return conn, transport


async def exchange(pieces: list[bytes], head_only: bool = False, decode: bool = False
                   ) -> tuple[int, dict[bytes, bytes], bytes, bool]:
    """Feed a response in pieces: status, headers, the body as relayed, and whether the connection went back
    to the pool."""
    pool = Pool(idle_timeout=5)
    conn, transport = fake_connection(pool, head_only, decode)
    for piece in pieces:
        conn.data_received(piece)
    head = await conn.response()
    sink = Sink()
    sink.write(conn.first)
    await conn.relay(sink)
    conn.release()
    await asyncio.sleep(0)
    reused = not transport.aborted and pool._idle.get(1) == [conn]
    return head.status, dict(head.headers), sink.data, reused


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
CHUNKED_BODY = b"7\r\ndata: a\r\n1a;ext=1\r\n" + b"x" * 26 + b"\r\n0\r\nTrailer-Field: t\r\n\r\n"
CHUNKED = CHUNKED_HEAD + CHUNKED_BODY


def test_a_chunked_body_is_relayed_as_sent_at_every_split_point_and_byte_by_byte() -> None:
    async def main() -> None:
        for split in range(1, len(CHUNKED)):
            status, headers, body, reused = await exchange([CHUNKED[:split], CHUNKED[split:]])
            assert (status, body, reused) == (200, CHUNKED_BODY, True), split
        status, headers, body, reused = await exchange([CHUNKED[i : i + 1] for i in range(len(CHUNKED))])
        assert body == CHUNKED_BODY and reused
        assert headers[b"Transfer-Encoding"] == b"chunked"

    run(main())


def test_an_http10_client_gets_the_decoded_body() -> None:
    async def main() -> None:
        for split in range(1, len(CHUNKED), 7):
            _, _, body, reused = await exchange([CHUNKED[:split], CHUNKED[split:]], decode=True)
            assert (body, reused) == (b"data: a" + b"x" * 26, True), split

    run(main())


def test_content_length_body_and_keep_alive() -> None:
    async def main() -> None:
        raw = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-A:  spaced \r\n\r\nhello"
        for split in range(1, len(raw)):
            status, headers, body, reused = await exchange([raw[:split], raw[split:]])
            assert (status, body, reused) == (201, b"hello", True)
            assert headers[b"X-A"] == b"spaced"

    run(main())


def test_a_small_body_is_held_whole_and_a_large_one_from_its_first_bytes() -> None:
    async def main() -> None:
        pool = Pool(idle_timeout=5)
        conn, _ = fake_connection(pool)
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        waiting = asyncio.ensure_future(conn.response())
        await asyncio.sleep(0.01)
        assert not waiting.done()  # all of a small body, or none of it, reaches the client
        conn.data_received(b"defghij")
        await waiting
        assert (conn.first, conn.complete) == (b"abcdefghij", True)
        conn, _ = fake_connection(pool)
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\nabc" % (WHOLE_LIMIT + 1))
        head = await conn.response()
        assert (head.framing, conn.first, conn.complete) == (Framing.LENGTH, b"abc", False)

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
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!", b"!", True),
        # Bytes past the declared end never reach the client, and the connection is not trusted again.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", b"ok", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nEXTRA", b"2\r\nok\r\n0\r\n\r\n", False),
    ],
)
def test_framings(raw: bytes, body: bytes, reused: bool) -> None:
    async def main() -> None:
        pool = Pool(idle_timeout=5)
        conn, transport = fake_connection(pool)
        conn.data_received(raw)
        if b"Content-Length" not in raw and b" 204 " not in raw:
            conn.connection_lost(None)  # the replica closes: that ends an until-close body
        await conn.response()
        sink = Sink()
        sink.write(conn.first)
        if not conn.complete:
            await conn.relay(sink)
        conn.release()
        assert sink.data == body and (not transport.aborted and not conn.closed) == reused

    run(main())


def test_head_response_keeps_its_content_length_but_has_no_body() -> None:
    async def main() -> None:
        status, headers, body, reused = await exchange(
            [b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"], head_only=True
        )
        assert (status, headers[b"Content-Length"], body, reused) == (200, b"1234", b"", True)

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
        b"HTTP/1.1 200 OK\r\nContent-Length: \xc2\xb2\r\n\r\nab",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * 70_000,
    ],
)
def test_malformed_heads_are_broken_responses(raw: bytes) -> None:
    async def main() -> None:
        conn, transport = fake_connection(Pool(idle_timeout=5))
        conn.data_received(raw)
        with pytest.raises(BrokenResponse) as broken:
            await conn.response()
        assert not isinstance(broken.value, ResponseCut)  # invalid, not cut: the proxy does not retry it
        assert transport.aborted

    run(main())


@pytest.mark.parametrize("body", [b"zz\r\n", b"0x5\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n"])
def test_malformed_chunks_break_the_body(body: bytes) -> None:
    async def main() -> None:
        conn, transport = fake_connection(Pool(idle_timeout=5))
        conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await asyncio.sleep(0)
        conn.data_received(body)
        with pytest.raises(BrokenResponse):
            await conn.response()
            await conn.relay(Sink())
        conn.release()
        assert transport.aborted

    run(main())


def test_a_connection_cut_mid_body_or_mid_head_is_a_cut_and_before_any_byte_is_no_response() -> None:
    async def main() -> None:
        pool = Pool(idle_timeout=5)
        conn, _ = fake_connection(pool)
        conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await conn.response()
        assert conn.first == b"3\r\nabc\r\n"
        conn.connection_lost(ConnectionResetError("reset"))
        with pytest.raises(ResponseCut):
            await conn.relay(Sink())

        conn, _ = fake_connection(pool)  # a small body cut before its end: nothing was held back to send
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        conn.connection_lost(None)
        with pytest.raises(ResponseCut):
            await conn.response()

        conn, _ = fake_connection(pool)  # framed by close: a reset is not a clean end
        conn.data_received(b"HTTP/1.1 200 OK\r\n\r\npartial")
        await conn.response()
        conn.connection_lost(ConnectionResetError("reset"))
        with pytest.raises(ResponseCut):
            await conn.relay(Sink())

        conn, _ = fake_connection(pool)
        conn.data_received(b"HTTP/1.1 200 OK\r\n")
        conn.connection_lost(None)
        with pytest.raises(ResponseCut):
            await conn.response()

        conn, _ = fake_connection(pool)
        conn.connection_lost(None)
        with pytest.raises(NoResponse):
            await conn.response()

    run(main())


def test_a_paused_connection_is_not_timed_out_for_the_silence_it_was_told_to_keep() -> None:
    async def main() -> None:
        conn, transport = fake_connection(Pool(idle_timeout=0.1))
        conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await conn.response()
        sink = Sink()
        relaying = asyncio.ensure_future(conn.relay(sink))
        conn.pause_reading()  # the client stopped reading: the replica is held back
        assert transport.paused
        await asyncio.sleep(0.35)
        assert not relaying.done()
        conn.resume_reading()
        conn.data_received(b"3\r\ndef\r\n0\r\n\r\n")
        await relaying
        assert sink.data == b"3\r\ndef\r\n0\r\n\r\n" and not transport.paused

    run(main())


def test_chunk_boundaries_are_known_for_the_cut_rule() -> None:
    async def main() -> None:
        conn, _ = fake_connection(Pool(idle_timeout=5))
        conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\ndata: a\n")
        await conn.response()
        assert conn.in_chunk  # the event's chunk has not ended
        conn.data_received(b"\r\n")
        assert not conn.in_chunk

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
                conn, _ = await pool.request(port, request(body), body)
                assert await body_of(conn) == body
                conn.release()
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
                conn, _ = await pool.request(port, request(), b"")
                assert await body_of(conn) == b"ok"
                conn.release()
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
            with pytest.raises(UpstreamTimeout):  # a head, then nothing: no first bytes before the timeout
                await pool.request(port, request(), b"")
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


def test_a_connection_released_before_its_body_ended_is_not_pooled() -> None:
    # The client left while the replica was still sending: reusing this connection would start the next
    # client's body with the leftover bytes.
    async def main() -> tuple[bool, bool]:
        pool = Pool(idle_timeout=5)
        conn, transport = fake_connection(pool)
        conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await conn.response()
        conn.release()
        await asyncio.sleep(0)
        return transport.aborted, pool._idle.get(1) == [conn]

    aborted, pooled = run(main())
    assert aborted and not pooled


async def body_of(conn: UpstreamConnection) -> bytes:
    sink = Sink()
    sink.write(conn.first)
    await conn.relay(sink)
    return sink.data
