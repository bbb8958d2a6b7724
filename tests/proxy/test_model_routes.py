"""The proxy's per-model routes `/m/{NAME}/…` (SPEC §16), through the real proxy over real sockets to an
in-process upstream that echoes what it was sent."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from helpers import LocalProxy

from gpud.registry import Model, Registry, Replica, ReplicaState
from gpud.spec import ModelSpec

KEY = "proxy-key"


@contextlib.asynccontextmanager
async def echo() -> AsyncIterator[int]:
    """An upstream answering every request with its method, raw path and body."""

    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"method": request.method, "path": request.raw_path,
                                  "body": (await request.read()).decode()})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def add_model(registry: Registry, name: str, port: int, state: ReplicaState = ReplicaState.READY,
              stopping: bool = False) -> Model:
    model = Model(spec=ModelSpec(name=name, model=name, engine="sim", replicas=1), stopping=stopping)
    model.replicas[0] = Replica(model=name, index=0, gpus=(), vram_by_gpu=(), port=port, state=state)
    registry.models[name] = model
    registry.changed(name)  # as the daemon's registry does: the proxy's table follows
    return model


@contextlib.asynccontextmanager
async def proxy_over(registry: Registry, **settings: Any) -> AsyncIterator[aiohttp.ClientSession]:
    local = LocalProxy(registry, **settings)
    host, port = await local.start()
    try:
        async with aiohttp.ClientSession(base_url=f"http://{host}:{port}") as client:
            yield client
    finally:
        await local.close()


def run(test: Any) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


def test_health_follows_the_model_and_needs_no_key() -> None:
    async def test() -> None:
        registry = Registry()
        async with echo() as port, proxy_over(registry, api_keys=(KEY,)) as client:
            add_model(registry, "up", port)
            add_model(registry, "Qwen/Qwen2.5-7B", port)
            add_model(registry, "coming", port, ReplicaState.STARTING)
            add_model(registry, "leaving", port, stopping=True)
            expected = {"up": 200, "Qwen%2FQwen2.5-7B": 200, "coming": 503, "leaving": 503, "nope": 404}
            for name, status in expected.items():
                async with client.get(f"/m/{name}/health") as resp:
                    body = await resp.json()
                    assert resp.status == status, (name, body)
            async with client.get("/m/coming/health") as resp:
                assert await resp.json() == {"status": "unavailable", "model": "coming", "state": "starting",
                                             "ready": 0}

    run(test)


def test_v1_models_lists_that_model_alone() -> None:
    async def test() -> None:
        registry = Registry()
        async with echo() as port, proxy_over(registry, api_keys=(KEY,)) as client:
            add_model(registry, "a", port)
            add_model(registry, "b/c", port, ReplicaState.STARTING)
            auth = {"Authorization": f"Bearer {KEY}"}
            async with client.get("/m/b%2Fc/v1/models", headers=auth) as resp:
                assert resp.status == 200
                assert [m["id"] for m in (await resp.json())["data"]] == ["b/c"]
            async with client.get("/m/a/v1/models") as resp:
                assert resp.status == 401  # a model list needs the key, unlike health
            async with client.get("/m/zz/v1/models", headers=auth) as resp:
                assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"

    run(test)


def test_requests_go_to_the_named_model_as_the_rest_of_the_path() -> None:
    async def test() -> None:
        registry = Registry()
        async with echo() as port_a, echo() as port_b, proxy_over(registry) as client:
            add_model(registry, "a/1", port_a)
            add_model(registry, "b", port_b)
            body = json.dumps({"model": "b", "messages": []})
            # The path names the model, whatever the header or the body say; the body goes on unchanged.
            async with client.post("/m/a%2F1/v1/chat/completions?x=a%26b", data=body,
                                   headers={"X-Gpud-Model": "b", "Content-Type": "application/json"}) as resp:
                assert resp.status == 200 and resp.headers["X-Gpud-Replica"] == "0"
                seen = await resp.json()
            assert seen == {"method": "POST", "path": "/v1/chat/completions?x=a%26b", "body": body}
            async with client.post("/m/nope/v1/completions", json={"model": "b"}) as resp:
                assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
            async with client.post("/m/b", data=b"") as resp:
                assert (await resp.json())["path"] == "/"

    run(test)


def test_probes_go_to_a_ready_replica_or_get_503() -> None:
    async def test() -> None:
        registry = Registry()
        async with echo() as port, proxy_over(registry, api_keys=(KEY,)) as client:
            add_model(registry, "up", port)
            add_model(registry, "coming", port, ReplicaState.STARTING)
            auth = {"Authorization": f"Bearer {KEY}"}
            for probe in ("version", "server_info", "model_info", "loads", "metrics"):
                async with client.get(f"/m/up/{probe}", headers=auth) as resp:
                    assert resp.status == 200 and (await resp.json())["path"] == f"/{probe}"
                async with client.get(f"/m/coming/{probe}", headers=auth) as resp:
                    assert resp.status == 503 and (await resp.json())["error"]["code"] == "no_ready_replica"
            async with client.get("/m/up/version") as resp:
                assert resp.status == 401  # only health goes without the key

    run(test)


def test_the_usual_routes_are_unchanged() -> None:
    async def test() -> None:
        registry = Registry()
        async with echo() as port, proxy_over(registry) as client:
            add_model(registry, "m", port)
            async with client.post("/v1/completions", json={"model": "m"}) as resp:
                assert (await resp.json())["path"] == "/v1/completions"
            async with client.get("/mm/x", headers={"X-Gpud-Model": "m"}) as resp:
                assert (await resp.json())["path"] == "/mm/x"
            async with client.get("/health") as resp:
                assert await resp.json() == {"status": "ok"}

    run(test)
