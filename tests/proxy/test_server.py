"""gpud.proxy.server against real sim replicas (subprocesses) and an in-process echo upstream, over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import LocalProxy

from gpud.errors import GpudError
from gpud.proxy.server import Proxy
from gpud.registry import Model, Registry, Replica, ReplicaState
from gpud.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[2]
READY = ReplicaState.READY
COMPLETION = {"model": "m", "prompt": "hi", "max_tokens": 1}


# -- fixtures: sim replicas as real processes ----------------------------------------------------------------


class Sim:
    """One `python -m gpud.sim.server` on a port the kernel picked."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpud.sim.server",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--startup-s",
                "0",
                *args,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # printed once listening (and /health is 200 with --startup-s 0)
        match = re.search(r"listening on [\d.]+:(\d+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"simserver did not start: {line!r}")
        self.port = int(match.group(1))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def sims(n: int, *args: str) -> Iterator[list[Sim]]:
    started: list[Sim] = []
    try:
        for _ in range(n):
            started.append(Sim(*args))
        yield started
    finally:
        for sim in started:
            sim.stop()


@pytest.fixture(scope="module")
def ports() -> Iterator[list[int]]:
    """Three ordinary sim replicas shared by the tests that do not harm them."""
    with sims(3) as fleet:
        yield [s.port for s in fleet]


@pytest.fixture(scope="module")
def slow_port() -> Iterator[int]:
    """A replica whose first token takes a minute: a request to it stays in flight, answering nothing."""
    with sims(1, "--ttft-ms", "60000") as fleet:
        yield fleet[0].port


def make_registry(models: dict[str, list[int]], state: ReplicaState = READY) -> Registry:
    registry = Registry()
    for name, model_ports in models.items():
        model = Model(spec=ModelSpec(name=name, model=name, engine="sim", replicas=max(1, len(model_ports))))
        for i, port in enumerate(model_ports):
            model.replicas[i] = Replica(model=name, index=i, gpus=(), vram_by_gpu=(), port=port, state=state)
        registry.models[name] = model
    return registry


@contextlib.asynccontextmanager
async def serving(registry: Registry, **kwargs: Any) -> AsyncIterator[tuple[LocalProxy, aiohttp.ClientSession]]:
    local = LocalProxy(registry, **kwargs)
    host, port = await local.start()
    try:
        async with aiohttp.ClientSession(base_url=f"http://{host}:{port}") as client:
            yield local, client
    finally:
        await local.close()


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 45))  # type: ignore[arg-type]


async def wait_for(
    condition: Callable[[], Awaitable[bool]] | Callable[[], bool], what: str, timeout: float = 10
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def running_on(port: int) -> float:
    """`vllm:num_requests_running` of the sim on `port`."""
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    match = re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M)
    assert match, text
    return float(match.group(1))


async def running_is(port: int, n: int) -> bool:
    return await running_on(port) == n


# -- an echo upstream for exact header/body checks --------------------------------------------------------


@contextlib.asynccontextmanager
async def echo_upstream() -> AsyncIterator[tuple[int, asyncio.Event]]:
    gate = asyncio.Event()

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": list(request.headers.items()),
                "sha256": hashlib.sha256(body).hexdigest(),
                "length": len(body),
            },
            headers={"X-Upstream": "yes", "Keep-Alive": "timeout=5", "Set-Cookie": "a=1"},
        )

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(b"hello " * 1000),
            headers={"Content-Encoding": "gzip"},
            content_type="text/plain",
        )

    async def gated(request: web.Request) -> web.StreamResponse:
        # The second chunk is only sent once the test has seen the first one through the proxy: a proxy that
        # buffered the stream would make the test time out.
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await gate.wait()
        await response.write(b"data: second\n\n")
        await response.write_eof()
        return response

    app = web.Application(client_max_size=2**26)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/gated", gated)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], gate
    finally:
        await runner.cleanup()


# -- balancing ----------------------------------------------------------------------------------------------


def test_sequential_requests_spread_3_3_3_and_say_which_replica_answered(ports: list[int]) -> None:
    async def main() -> None:
        pids = {}
        async with aiohttp.ClientSession() as s:
            for i, port in enumerate(ports):
                async with s.get(f"http://127.0.0.1:{port}/health") as r:
                    pids[r.headers["X-Sim-Pid"]] = i
        async with serving(make_registry({"m": ports})) as (_, client):
            seen = []
            for _ in range(9):
                async with client.post("/v1/completions", json=COMPLETION) as r:
                    assert r.status == 200
                    body = await r.json()
                    assert body["choices"][0]["text"]
                    replica = int(r.headers["X-Gpud-Replica"])
                    assert (
                        pids[r.headers["X-Sim-Pid"]] == replica
                    )  # the header names the replica that answered
                    seen.append(replica)
        assert seen == [0, 1, 2] * 3

    run(main())


def test_a_long_stream_on_one_replica_sends_new_requests_to_the_others(ports: list[int]) -> None:
    async def main() -> None:
        registry = make_registry({"m": ports})
        async with serving(registry) as (_, client):
            stream = await client.post(
                "/v1/completions", json={**COMPLETION, "max_tokens": 5000, "stream": True}
            )
            assert stream.headers["X-Gpud-Replica"] == "0"
            await stream.content.readany()
            assert registry.models["m"].replicas[0].inflight == 1
            seen = []
            for _ in range(6):
                async with client.post("/v1/completions", json=COMPLETION) as r:
                    seen.append(int(r.headers["X-Gpud-Replica"]))
            assert seen == [1, 2] * 3
            stream.close()
            await wait_for(lambda: registry.models["m"].replicas[0].inflight == 0, "the stream to end")

    run(main())


def test_only_ready_replicas_get_traffic(ports: list[int]) -> None:
    async def main() -> None:
        registry = make_registry({"m": ports})
        replicas = registry.models["m"].replicas
        replicas[0].state = ReplicaState.STARTING
        replicas[2].state = ReplicaState.STOPPING
        async with serving(registry) as (_, client):
            for _ in range(4):
                async with client.post("/v1/completions", json=COMPLETION) as r:
                    assert r.headers["X-Gpud-Replica"] == "1"

    run(main())


# -- routing and passthrough -------------------------------------------------------------------------------


def test_header_routes_without_parsing_the_body_else_the_body_model_routes() -> None:
    async def main() -> None:
        async with (
            echo_upstream() as (echo_port, _),
            serving(make_registry({"echo": [echo_port], "other": [echo_port]})) as (_, client),
        ):
            # Header wins, and the body is not even JSON: it is not parsed.
            async with client.post("/v1/x", data=b"\x00not json", headers={"X-Gpud-Model": "echo"}) as r:
                assert r.status == 200
                assert (await r.json())["sha256"] == hashlib.sha256(b"\x00not json").hexdigest()
            async with client.post("/v1/x", json={"model": "nope"}, headers={"X-Gpud-Model": "echo"}) as r:
                assert r.status == 200
            async with client.post("/v1/x", json={"model": "echo"}, headers={"X-Gpud-Model": "nope"}) as r:
                assert r.status == 404
            async with client.post("/v1/x", json={"model": "other"}) as r:
                assert r.status == 200
            async with client.get("/v1/models/echo/files", headers={"X-Gpud-Model": "echo"}) as r:
                assert (await r.json())["path"] == "/v1/models/echo/files"

    run(main())


def test_path_query_body_and_end_to_end_headers_pass_unchanged_hop_by_hop_do_not() -> None:
    async def main() -> None:
        body = os.urandom(300_000)  # over the proxy's whole-response buffer size, binary
        async with (
            echo_upstream() as (echo_port, _),
            serving(make_registry({"echo": [echo_port]})) as (_, client),
        ):
            headers = {
                "X-Gpud-Model": "echo",
                "Authorization": "Bearer upstream-token",
                "X-Custom": "a, b",
                "Content-Type": "application/octet-stream",
                "Connection": "keep-alive, X-Drop-Me",
                "X-Drop-Me": "1",
                "Keep-Alive": "timeout=9",
                "TE": "trailers",
                "Proxy-Authorization": "Basic x",
                "X-Forwarded-For": "10.0.0.1",
                "X-Forwarded-Proto": "https",
                "User-Agent": "tester/1",
            }
            async with client.put(
                "/v1/a%2Fb/c?x=1&y=%20z&x=2",
                data=body,
                headers=headers,
                skip_auto_headers=("Accept", "Accept-Encoding"),
            ) as r:
                assert r.status == 200
                assert r.headers["X-Gpud-Replica"] == "0"
                assert r.headers["X-Upstream"] == "yes" and r.headers["Set-Cookie"] == "a=1"
                assert "Keep-Alive" not in r.headers
                echoed = await r.json()
            got = {k.lower(): v for k, v in echoed["headers"]}
            assert echoed["method"] == "PUT"
            assert echoed["path"] == "/v1/a%2Fb/c?x=1&y=%20z&x=2"
            assert echoed["sha256"] == hashlib.sha256(body).hexdigest() and echoed["length"] == len(body)
            assert got["authorization"] == "Bearer upstream-token"  # no api_keys: the client's own token
            assert got["x-custom"] == "a, b" and got["user-agent"] == "tester/1"
            assert got["content-type"] == "application/octet-stream"
            assert got["x-gpud-model"] == "echo"
            assert got["host"] == f"127.0.0.1:{echo_port}"
            assert got["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
            assert got["x-forwarded-proto"] == "http"
            for hop in ("x-drop-me", "keep-alive", "te", "proxy-authorization"):
                assert hop not in got
            # The proxy adds no headers of its own beyond X-Forwarded-*.
            assert "accept-encoding" not in got and "accept" not in got

            # A compressed body passes as the replica encoded it (the client decodes it, once).
            async with client.get("/gzip", headers={"X-Gpud-Model": "echo"}) as r:
                assert r.headers["Content-Encoding"] == "gzip"
                assert await r.read() == b"hello " * 1000

    run(main())


def test_bad_requests_get_4xx_with_openai_error_bodies(ports: list[int]) -> None:
    async def main() -> None:
        registry = make_registry({"m": ports})
        registry.models["idle"] = make_registry({"idle": ports}, state=ReplicaState.STARTING).models["idle"]
        async with serving(registry, max_body_bytes=4096) as (metrics, client):

            async def expect(status: int, code: str, **kwargs: Any) -> aiohttp.ClientResponse:
                async with client.post("/v1/completions", **kwargs) as r:
                    body = await r.json()
                    assert r.status == status, body
                    assert body["error"]["code"] == code and body["error"]["message"]
                    assert body["error"]["type"] in ("invalid_request_error", "server_error")
                    return r

            r = await expect(404, "model_not_found", json={"model": "missing"})
            await expect(404, "model_not_found", data=b"{}", headers={"X-Gpud-Model": "missing"})
            r = await expect(503, "no_ready_replica", json={"model": "idle"})
            assert r.headers["Retry-After"] == "1"
            await expect(400, "invalid_json", data=b"{not json")
            await expect(400, "invalid_json", data=b"\xff\xfe")
            await expect(400, "invalid_json", data=b"[" * 2000 + b"]" * 2000)
            await expect(400, "model_required", json={"prompt": "x"})
            await expect(400, "model_required", json=["m"])
            await expect(400, "model_required", json={"model": 7})
            await expect(400, "model_required")
            await expect(413, "request_too_large", json={"model": "m", "prompt": "x" * 5000})

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit applies while reading
                for _ in range(10):
                    yield b" " * 1000

            await expect(413, "request_too_large", data=chunks(), headers={"X-Gpud-Model": "m"})
            async with client.get("/v1/models/missing") as r:
                assert r.status == 404
            # A good request still works on the same proxy.
            async with client.post("/v1/completions", json=COMPLETION) as r:
                assert r.status == 200
        text = metrics.render()[0].decode()
        assert 'gpud_proxy_errors_total{kind="too_large",model="",replica=""} 2.0' in text
        assert 'gpud_proxy_requests_total{code="404",model="",replica=""} 2.0' in text
        assert 'gpud_proxy_errors_total{kind="no_ready_replica",model="idle",replica=""} 1.0' in text

    run(main())


def test_models_list_shows_models_with_a_ready_replica(ports: list[int]) -> None:
    async def main() -> None:
        registry = make_registry({"org/a": ports[:1], "b": ports[1:2], "c": ports[2:]})
        registry.models["c"].replicas[0].state = ReplicaState.STARTING
        async with serving(registry) as (_, client):
            async with client.get("/v1/models") as r:
                body = await r.json()
            assert body["object"] == "list"
            assert [m["id"] for m in body["data"]] == ["org/a", "b"]
            for m in body["data"]:
                assert m["object"] == "model" and m["owned_by"] == "gpud" and isinstance(m["created"], int)
            async with client.get("/v1/models/org/a") as r:
                assert (await r.json())["id"] == "org/a"
            async with client.get("/v1/models/c") as r:
                assert r.status == 404
            async with client.get("/health") as r:
                assert r.status == 200 and await r.json() == {"status": "ok"}

    run(main())


# -- streaming ---------------------------------------------------------------------------------------------


def test_streams_are_forwarded_chunk_by_chunk() -> None:
    async def main() -> None:
        async with (
            echo_upstream() as (echo_port, gate),
            serving(make_registry({"echo": [echo_port]})) as (_, client),
        ):
            async with client.get("/gated", headers={"X-Gpud-Model": "echo"}) as r:
                assert r.headers["Content-Type"] == "text/event-stream"
                assert r.headers["X-Gpud-Replica"] == "0"
                first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
                assert first == b"data: first\n\n"
                gate.set()  # the upstream sends the rest only now
                assert await r.content.read() == b"data: second\n\n"

    run(main())


def test_sse_through_the_proxy_matches_direct_and_records_ttfb(ports: list[int]) -> None:
    async def main() -> None:
        registry = make_registry({"m": ports[:1]})
        request = {**COMPLETION, "max_tokens": 40, "stream": True}
        async with serving(registry) as (metrics, client):
            async with client.post("/v1/completions", json=request) as r:
                events = [line async for line in r.content if line.startswith(b"data: ")]
        assert len(events) == 41 and events[-1] == b"data: [DONE]\n"
        assert json.loads(events[0][6:])["model"] == "m"
        text = metrics.render()[0].decode()
        assert 'gpud_proxy_ttfb_seconds_count{model="m",replica="0"} 1.0' in text
        assert 'gpud_proxy_requests_total{code="200",model="m",replica="0"} 1.0' in text
        assert 'gpud_proxy_request_duration_seconds_count{model="m",replica="0"} 1.0' in text
        assert 'gpud_proxy_inflight_requests{model="m",replica="0"} 0.0' in text

    run(main())


def test_a_client_disconnect_cancels_the_upstream_request(ports: list[int], slow_port: int) -> None:
    async def main() -> None:
        registry = make_registry({"m": ports[:1], "slow": [slow_port]})
        async with serving(registry) as (_, client):
            # Mid-stream: the replica stops generating once the client is gone.
            stream = await client.post(
                "/v1/completions", json={**COMPLETION, "max_tokens": 100_000, "stream": True}
            )
            await stream.content.readany()
            assert await running_on(ports[0]) == 1
            stream.close()
            await wait_for(lambda: running_is(ports[0], 0), "the sim to stop generating")
            await wait_for(lambda: registry.models["m"].replicas[0].inflight == 0, "inflight to drop")

            # Before any byte (the replica is still "thinking"): cancelling the client cancels upstream too.
            task = asyncio.ensure_future(client.post("/v1/completions", json={**COMPLETION, "model": "slow"}))
            await wait_for(lambda: running_is(slow_port, 1), "the slow request to run")
            assert registry.models["slow"].replicas[0].inflight == 1
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await wait_for(lambda: running_is(slow_port, 0), "the slow request to be cancelled")
            await wait_for(lambda: registry.models["slow"].replicas[0].inflight == 0, "inflight to drop")

    run(main())


# -- failures ----------------------------------------------------------------------------------------------


def test_a_killed_replica_costs_no_request_that_had_no_response_bytes() -> None:
    async def main(fleet: list[Sim]) -> None:
        registry = make_registry({"m": [s.port for s in fleet]})
        failed: list[int] = []

        def on_connect_failure(replica: Replica) -> None:  # what the supervisor does
            failed.append(replica.index)
            registry.set_state(replica, ReplicaState.UNHEALTHY, "connection refused")
        async with serving(registry, on_connect_failure=on_connect_failure) as (metrics, client):
            # A stream that has sent bytes from replica 0 is cut, not retried.
            stream = await client.post(
                "/v1/completions", json={**COMPLETION, "max_tokens": 100_000, "stream": True}
            )
            assert stream.headers["X-Gpud-Replica"] == "0"
            await stream.content.readany()

            statuses: Counter[int] = Counter()
            replicas_after: list[int] = []
            stop = asyncio.Event()
            killed = asyncio.Event()

            async def worker() -> None:
                while not stop.is_set():
                    # 30 ms per request: some are always waiting on replica 0 when it dies.
                    async with client.post("/v1/completions", json={**COMPLETION, "max_tokens": 3}) as r:
                        await r.read()
                        statuses[r.status] += 1
                        if killed.is_set():
                            replicas_after.append(int(r.headers["X-Gpud-Replica"]))

            workers = [asyncio.ensure_future(worker()) for _ in range(12)]
            try:
                replica0 = registry.models["m"].replicas[0]
                await wait_for(
                    lambda: sum(statuses.values()) >= 30 and replica0.inflight >= 3,
                    "requests in flight on replica 0",
                )
                fleet[0].kill()
                killed.set()
                with pytest.raises(aiohttp.ClientPayloadError):
                    while await stream.content.readany():
                        pass
                await wait_for(lambda: len(replicas_after) >= 60, "requests after the kill")
            finally:
                stop.set()
                await asyncio.gather(*workers)
            stream.close()

        assert statuses == {200: statuses[200]}  # every request succeeded, some after a retry
        assert failed[:1] == [0] and set(failed) == {0}
        assert replica0.state is ReplicaState.UNHEALTHY and replica0.inflight == 0
        assert set(replicas_after[-40:]) <= {1, 2}
        text = metrics.render()[0].decode()
        retried = re.search(
            r'^gpud_proxy_errors_total\{kind="connect",model="m",replica="0"\} (\S+)$', text, re.M
        )
        assert retried and float(retried.group(1)) >= 1  # in flight at the kill, then answered elsewhere
        assert 'gpud_proxy_errors_total{kind="upstream",model="m",replica="0"} 1.0' in text  # the cut stream

    with sims(3) as fleet:
        run(main(fleet))


def test_a_replica_silent_past_the_idle_timeout_gives_504_and_is_not_retried(
    ports: list[int], slow_port: int
) -> None:
    async def main() -> None:
        registry = make_registry({"m": [slow_port, ports[0]]})
        async with serving(registry, idle_timeout_sec=0.3) as (_, client):
            async with client.post("/v1/completions", json=COMPLETION) as r:
                body = await r.json()
                assert r.status == 504 and body["error"]["code"] == "upstream_timeout"
            # The proxy gave up on the request, so the replica does too.
            await wait_for(lambda: running_is(slow_port, 0), "the timed-out request to be cancelled")
            # A stream that lasts longer than the idle timeout in total (80 tokens at 5 ms: 0.42 s) completes:
            # the timeout applies to each read, not to the whole stream.
            async with client.post(
                "/v1/completions",
                json={**COMPLETION, "max_tokens": 80, "stream": True},
                headers={"X-Gpud-Model": "m"},
            ) as r:
                assert r.headers["X-Gpud-Replica"] == "1"
                assert (await r.read()).endswith(b"data: [DONE]\n\n")

    run(main())


def test_all_replicas_unreachable_gives_502(ports: list[int]) -> None:
    async def main() -> None:
        with sims(2) as fleet:
            dead = [s.port for s in fleet]
        registry = make_registry({"m": dead})  # both ports closed now
        failed: list[int] = []
        async with serving(registry, on_connect_failure=lambda r: failed.append(r.index)) as (_, client):
            async with client.post("/v1/completions", json=COMPLETION) as r:
                body = await r.json()
                assert r.status == 502 and body["error"]["code"] == "upstream_unavailable"
        assert sorted(failed) == [0, 1]

    run(main())


# -- auth, metrics, lifecycle -------------------------------------------------------------------------------


def test_api_keys_guard_every_route_but_health() -> None:
    async def main() -> None:
        async with (
            echo_upstream() as (echo_port, _),
            serving(
                make_registry({"echo": [echo_port]}), api_keys=["k-one", "k-two"]
            ) as (_, client),
        ):
            async with client.get("/health") as r:
                assert r.status == 200
            for auth in (None, "Bearer wrong", "k-one", "Basic k-one", "Bearer k-one-and-more", "Bearer "):
                headers = {"X-Gpud-Model": "echo"} | ({"Authorization": auth} if auth else {})
                for method, path in (
                    ("GET", "/v1/models"),
                    ("GET", "/metrics"),
                    ("POST", "/v1/chat/completions"),
                ):
                    async with client.request(method, path, headers=headers) as r:
                        assert r.status == 401, (auth, path)
                        assert r.headers["WWW-Authenticate"] == "Bearer"
                        assert (await r.json())["error"]["code"] == "invalid_api_key"
            for key in ("k-one", "k-two"):
                async with client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
                    assert r.status == 200
            async with client.post(
                "/v1/x", headers={"Authorization": "bearer k-two", "X-Gpud-Model": "echo"}
            ) as r:
                assert r.status == 200
                got = {k.lower() for k, _ in (await r.json())["headers"]}
                assert "authorization" not in got  # gpud's key is not passed to the replica

    run(main())


def test_metrics_route_serves_prometheus_text(ports: list[int]) -> None:
    class Ledger:
        def to_json(self) -> dict[str, Any]:
            return {
                "gpus": [
                    {
                        "index": 0,
                        "total_bytes": 100,
                        "used_by_others_bytes": 10,
                        "reserved_bytes": 20,
                        "available_bytes": 70,
                    }
                ]
            }

    async def main() -> None:
        registry = make_registry({"m": ports})
        registry.models["m"].replicas[2].restarts = 2
        async with serving(registry, gpus=lambda: Ledger().to_json()["gpus"]) as (_, client):
            for _ in range(3):
                async with client.post("/v1/completions", json=COMPLETION) as r:
                    assert r.status == 200
            async with client.get("/metrics") as r:
                assert r.headers["Content-Type"].startswith("text/plain")
                text = await r.text()
        for replica in "012":
            assert f'gpud_proxy_requests_total{{code="200",model="m",replica="{replica}"}} 1.0' in text
            assert f'gpud_proxy_request_duration_seconds_count{{model="m",replica="{replica}"}} 1.0' in text
        assert 'gpud_replica_restarts_total{model="m",replica="2"} 2.0' in text
        assert 'gpud_gpu_available_bytes{gpu="0"} 70.0' in text

    run(main())


def test_a_busy_address_is_a_clear_error() -> None:
    async def main() -> None:
        async with serving(Registry()) as (local, _):
            host, port = local.proxy.address
            other = Proxy()
            with pytest.raises(GpudError, match="already in use"):
                await other.start(host, port)
            await other.close()

    run(main())


@contextlib.asynccontextmanager
async def dying_upstream(answer: bytes) -> AsyncIterator[int]:
    """A replica that reads a request head, sends `answer` (a partial response) and closes the connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def test_a_replica_dying_before_the_client_got_a_byte_is_retried_even_after_its_head() -> None:
    async def main() -> None:
        sse_head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        async with (
            dying_upstream(b"HTTP/1.1 200 OK\r\nContent-Le") as mid_head,
            dying_upstream(sse_head) as before_first_chunk,
            dying_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial") as mid_small_body,
            echo_upstream() as (echo_port, _),
        ):
            registry = make_registry({"m": [mid_head, before_first_chunk, mid_small_body, echo_port]})
            async with serving(registry) as (metrics, client):
                for _ in range(4):  # each request meets the dying replicas in a different order
                    async with client.post("/v1/completions", json=COMPLETION) as r:
                        assert r.status == 200 and r.headers["X-Gpud-Replica"] == "3"
                        assert (await r.json())["path"] == "/v1/completions"
        text = metrics.render()[0].decode()
        for replica in "012":
            assert f'gpud_proxy_errors_total{{kind="connect",model="m",replica="{replica}"}}' in text
        assert 'kind="upstream"' not in text  # none of them counted as a broken answer to a client

    run(main())
