"""Refused requests (431 too many or too large header fields, 413 too large a body): never handled, whatever
else the same read held, and the answer reaches a client that is still uploading (no reset)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from helpers import LocalProxy

from gpud.proxy import connection
from gpud.proxy.connection import MAX_HEADERS, ClientConnection, Request
from gpud.registry import Model, Registry, Replica, ReplicaState
from gpud.spec import ModelSpec


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = b""
        self.eof = False
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += bytes(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name == "peername" else default


class Hooks:
    client_timeout = 60.0
    max_body = 1000

    def __init__(self) -> None:
        self.handled: list[Request] = []
        self.refused: list[tuple[int, str]] = []

    async def handle(self, conn: ClientConnection, request: Request) -> None:
        self.handled.append(request)
        conn.finish(True)

    def closed(self, conn: ClientConnection) -> None:
        pass

    def client_timed_out(self) -> None:
        pass

    def rejected(self, status: int, kind: str) -> None:
        self.refused.append((status, kind))


async def feed(data: bytes) -> tuple[Hooks, FakeTransport, ClientConnection]:
    hooks = Hooks()
    conn = ClientConnection(hooks)
    transport = FakeTransport()
    conn.connection_made(transport)
    conn.data_received(data)
    await asyncio.sleep(0)  # a handler task, had one been started, would have run by now
    return hooks, transport, conn


@pytest.mark.parametrize(("request_bytes", "status"), [
    # More header fields than allowed, then a whole body, in one read.
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-F%d: v\r\n" % i for i in range(MAX_HEADERS + 2))
     + b"Content-Length: 2\r\n\r\n{}", 431),
    # A chunked body that passes the limit in the same read as its end: the truncated rest must not go out.
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"258\r\n" + b"x" * 600 + b"\r\n" + b"258\r\n" + b"y" * 600 + b"\r\n0\r\n\r\n", 413),
    # A declared length over the limit, the body in the same read.
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1200\r\n\r\n" + b"z" * 1200, 413),
])
def test_a_refused_request_is_answered_once_and_never_handled(request_bytes: bytes, status: int) -> None:
    async def main() -> None:
        hooks, transport, _ = await feed(request_bytes + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert hooks.handled == [], "a refused request (or one pipelined behind it) was handled"
        assert transport.out.startswith(b"HTTP/1.1 %d " % status) and transport.out.count(b"HTTP/1.1") == 1
        assert len(hooks.refused) == 1 and hooks.refused[0][0] == status
        assert transport.eof and not transport.closed, "the refusal closes our side and lingers for the client's"

    run(main())


def test_after_a_refusal_the_connection_closes_once_the_client_is_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "LINGER_QUIET_SEC", 0.05)

    async def main() -> None:
        hooks, transport, conn = await feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n")
        conn.data_received(b"more body nobody reads")
        assert hooks.handled == [] and not transport.closed
        deadline = asyncio.get_running_loop().time() + 10
        while not transport.closed:
            assert asyncio.get_running_loop().time() < deadline, "the lingering connection never closed"
            await asyncio.sleep(0.01)

    run(main())


def test_a_client_still_uploading_a_too_large_body_reads_the_413() -> None:
    """Over a real socket: the client sends 8 MiB against a 4 KiB limit and reads only then (as curl and
    most clients do). Without the lingering close its unread bytes would make the kernel reset the
    connection and the 413 would be lost."""

    async def main() -> None:
        registry = Registry()
        model = Model(spec=ModelSpec(name="m", model="m", engine="sim", replicas=1))
        model.replicas[0] = Replica(model="m", index=0, gpus=(), vram_by_gpu=(), port=9, state=ReplicaState.READY)
        registry.models["m"] = model  # never reached: the body is refused before any routing
        local = LocalProxy(registry, max_body_bytes=4096)
        host, proxy_port = await local.start()
        try:
            answer = await asyncio.to_thread(upload, host, proxy_port, 8 * 2**20)
        finally:
            await local.close()
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert b"request_too_large" in answer

    run(main())


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def upload(host: str, port: int, size: int) -> bytes:
    with socket.create_connection((host, port), timeout=20) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Gpud-Model: m\r\n"
                     b"Content-Length: %d\r\n\r\n" % size)
        chunk = b"x" * 65536
        sent = 0
        try:
            while sent < size:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy may stop reading at some point; what matters is the answer below
        answer = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return answer
            answer += data
