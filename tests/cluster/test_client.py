"""gpud.cluster.client over real sockets: what each kind of answer becomes (a worker list, or a GatewayError
of the kind the registrar acts on), against small in-process servers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from gpud.cluster.client import GatewayClient, GatewayError
from gpud.cluster.workers import Listed


@contextlib.asynccontextmanager
async def answering(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


def test_the_list_keeps_what_gpud_can_act_on() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"workers": [
            {"id": "1", "url": "http://n/m/a", "status": "ready", "labels": {"gpud_node": "http://n", "n": 3}},
            {"id": "2", "url": "http://n/m/b"},  # no status, no labels
            {"url": "http://n/m/c"}, {"id": "", "url": "x"}, "junk", None,  # nothing to act on
        ]})

    async def test() -> None:
        async with answering(handler) as url, GatewayClient(url, None, 2) as client:
            assert await client.list_workers() == [Listed("1", "http://n/m/a", "ready", {"gpud_node": "http://n"}),
                                                    Listed("2", "http://n/m/b", "", {})]

    run(test)


@pytest.mark.parametrize(
    ("status", "body", "kind", "words"),
    [
        (401, "Missing or invalid Authorization header", "refused", "cluster.api_key"),
        (403, '{"error": "forbidden"}', "refused", "HTTP 403: forbidden"),
        (409, '{"error": "Worker already exists", "code": "WORKER_ALREADY_EXISTS"}', "conflict", "already exists"),
        (503, "", "error", "HTTP 503"),
        (500, '{"error": {"message": "boom", "type": "x"}}', "error", "HTTP 500: boom"),
        (200, "not json", "garbage", "not JSON"),
        (200, '{"workers": 3}', "garbage", '"workers" list'),
        (200, "[]", "garbage", '"workers" list'),
    ],
)
def test_answers_that_are_not_a_list_are_errors_of_their_kind(status: int, body: str, kind: str, words: str) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body)

    async def test() -> None:
        async with answering(handler) as url, GatewayClient(url, "k", 2) as client:
            with pytest.raises(GatewayError) as err:
                await client.list_workers()
            assert err.value.kind == kind and words in err.value.message, err.value.message
            assert url in err.value.message

    run(test)


def test_add_and_remove_send_the_key_and_tolerate_what_they_may() -> None:
    seen: list[tuple[str, str, str | None]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.method, request.raw_path, request.headers.get("Authorization")))
        if request.method == "POST":
            return web.json_response({"status": "accepted", "worker_id": "w1"}, status=202)
        return web.json_response({"error": "Worker not found"}, status=404)  # already gone: fine

    async def test() -> None:
        async with answering(handler) as url, GatewayClient(url, "s3cret", 2) as client:
            assert await client.add_worker({"url": "http://n/m/a"}) == "w1"
            await client.remove_worker("../x y")
        assert seen == [("POST", "/workers", "Bearer s3cret"), ("DELETE", "/workers/..%2Fx%20y", "Bearer s3cret")]

    run(test)


def test_no_answer_in_time_and_no_server_are_unreachable() -> None:
    release = asyncio.Event()

    async def silent(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=200)

    async def test() -> None:
        async with answering(silent) as url, GatewayClient(url, None, 0.2) as client:
            with pytest.raises(GatewayError) as err:
                await client.list_workers()
            assert err.value.kind == "unreachable" and "no answer within 0.2 s" in err.value.message
            release.set()
        async with GatewayClient(url, None, 2) as client:  # the server is gone now
            with pytest.raises(GatewayError) as err:
                await client.add_worker({})
            assert err.value.kind == "unreachable" and "Cannot reach the gateway" in err.value.message

    run(test)
