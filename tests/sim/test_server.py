"""The sim engine server, run as a real subprocess and spoken to over HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import selectors
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from gpud.sim import api as simapi
from gpud.sim import server as simserver

DEADLINE_S = 10.0


@dataclass
class Sim:
    proc: subprocess.Popen[bytes]
    url: str


def _start(*args: str, env: dict[str, str] | None = None) -> Sim:
    """Start a sim server on a port the kernel picks and wait for its 'listening' line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpud.sim.server", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=DEADLINE_S):
            proc.kill()
            proc.wait()
            raise AssertionError("the sim server did not announce itself in time")
    line = proc.stdout.readline().decode()
    assert line.startswith("simserver listening on 127.0.0.1:"), line
    return Sim(proc, "http://127.0.0.1:" + line.rsplit(":", 1)[1].strip())


def _stop(sim: Sim) -> None:
    if sim.proc.poll() is None:
        sim.proc.kill()
    sim.proc.wait()
    for stream in (sim.proc.stdout, sim.proc.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture
def start_sim() -> Iterator[Callable[..., Sim]]:
    started: list[Sim] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Sim:
        sim = _start(*args, env=env)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        _stop(sim)


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    """A shared, ready-at-once server for the format tests."""
    server = _start("--startup-s", "0", "--ttft-ms", "20", "--itl-ms", "5", "--served-model-name", "simmy")
    yield server
    _stop(server)


def run(coro_fn: Callable[[aiohttp.ClientSession], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE_S)) as session:
            return await coro_fn(session)

    return asyncio.run(main())


async def _metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    return values


async def _wait_metrics(
    session: aiohttp.ClientSession, url: str, want: Callable[[dict[str, float]], bool]
) -> dict[str, float]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        values = await _metrics(session, url)
        if want(values):
            return values
        assert time.monotonic() < deadline, f"metrics never matched: {values}"
        await asyncio.sleep(0.02)


async def _sse(resp: aiohttp.ClientResponse) -> list[Any]:
    """The events of an SSE body: parsed JSON objects, and the string '[DONE]'."""
    events: list[Any] = []
    raw = (await resp.read()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


# --- health, pid, startup ------------------------------------------------------------------------


def test_health_is_503_during_startup_then_200(start_sim: Callable[..., Sim]) -> None:
    sim = start_sim("--startup-s", "2")

    async def check(session: aiohttp.ClientSession) -> None:
        async with session.get(sim.url + "/health") as resp:
            assert resp.status == 503
            assert resp.headers["X-Sim-Pid"] == str(sim.proc.pid)
        async with session.post(sim.url + "/v1/completions", json={"prompt": "x"}) as resp:
            assert resp.status == 503
            assert "error" in await resp.json()
        deadline = time.monotonic() + DEADLINE_S
        while True:
            async with session.get(sim.url + "/health") as resp:
                if resp.status == 200:
                    break
                assert resp.status == 503
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

    run(check)


# --- completions and chat ------------------------------------------------------------------------


def test_completion_format_and_timing(sim: Sim) -> None:
    async def check(session: aiohttp.ClientSession) -> None:
        t0 = time.monotonic()
        async with session.post(sim.url + "/v1/completions", json={"prompt": "hello there"}) as resp:
            body = await resp.json()
            assert resp.headers["X-Sim-Pid"] == str(sim.proc.pid)
        elapsed = time.monotonic() - t0
        assert resp.status == 200
        assert body["object"] == "text_completion"
        assert body["id"].startswith("cmpl-")
        assert body["model"] == "simmy"  # no model in the body: the served name
        (choice,) = body["choices"]
        assert choice["index"] == 0 and choice["finish_reason"] == "length"
        assert len(choice["text"].split()) == 16  # the default max_tokens
        usage = body["usage"]
        assert usage["completion_tokens"] == 16
        assert usage["total_tokens"] == usage["prompt_tokens"] + 16
        assert elapsed >= 0.075  # 20 ms to the first token, then 15 × 5 ms

        payload = {"model": "anything/else", "prompt": "hi", "max_tokens": 3}
        async with session.post(sim.url + "/v1/completions", json=payload) as resp:
            body = await resp.json()
        assert body["model"] == "anything/else"
        assert body["usage"]["completion_tokens"] == 3

    run(check)


def test_completion_stream_format_and_timing(sim: Sim) -> None:
    async def check(session: aiohttp.ClientSession) -> None:
        t0 = time.monotonic()
        payload = {"prompt": "hi", "max_tokens": 16, "stream": True}
        async with session.post(sim.url + "/v1/completions", json=payload) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = await _sse(resp)
        assert time.monotonic() - t0 >= 0.075
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert len(chunks) == 16
        assert {c["object"] for c in chunks} == {"text_completion"}
        assert len({c["id"] for c in chunks}) == 1
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 15 + ["length"]
        assert all(c["choices"][0]["text"].strip() for c in chunks)

    run(check)


def test_chat_formats(sim: Sim) -> None:
    messages = [{"role": "user", "content": "Say something."}]

    async def check(session: aiohttp.ClientSession) -> None:
        payload = {"messages": messages, "max_completion_tokens": 5}
        async with session.post(sim.url + "/v1/chat/completions", json=payload) as resp:
            body = await resp.json()
        assert body["object"] == "chat.completion"
        assert body["id"].startswith("chatcmpl-")
        (choice,) = body["choices"]
        assert choice["message"]["role"] == "assistant"
        assert len(choice["message"]["content"].split()) == 5
        assert choice["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 5

        payload = {
            "messages": messages,
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with session.post(sim.url + "/v1/chat/completions", json=payload) as resp:
            events = await _sse(resp)
        assert events[-1] == "[DONE]"
        first, *content, finish, usage = events[:-1]
        assert first["choices"][0]["delta"]["role"] == "assistant"
        assert len(content) == 4
        assert all(c["object"] == "chat.completion.chunk" for c in events[:-1])
        assert all(c["choices"][0]["delta"]["content"].strip() for c in content)
        assert finish["choices"][0]["finish_reason"] == "length"
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4

    run(check)


def test_invalid_requests_get_openai_errors(sim: Sim) -> None:
    async def check(session: aiohttp.ClientSession) -> None:
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
            async with session.post(sim.url + path, data=b"{not json") as resp:
                assert resp.status == 400
                error = (await resp.json())["error"]
                assert error["code"] == 400 and error["type"] and "JSON" in error["message"]
        for payload in ({"max_tokens": 0}, {"max_tokens": "many"}, {"stream": "yes"}, {"prompt": {}}):
            async with session.post(sim.url + "/v1/completions", json=payload) as resp:
                assert resp.status == 400, payload
        async with session.post(sim.url + "/v1/completions", json=[1, 2]) as resp:
            assert resp.status == 400

    run(check)


# --- queueing and cancellation -------------------------------------------------------------------


def test_requests_over_max_num_seqs_wait_and_disconnects_cancel(start_sim: Callable[..., Sim]) -> None:
    sim = start_sim("--startup-s", "0", "--max-num-seqs", "1", "--itl-ms", "20")

    async def check(session: aiohttp.ClientSession) -> None:
        # Each request would stream for 100 s: only cancellation can end it within the deadline.
        payload = {"prompt": "x", "max_tokens": 5000, "stream": True}

        async def one() -> None:
            async with (
                aiohttp.ClientSession() as own,
                own.post(sim.url + "/v1/completions", json=payload) as r,
            ):
                async for _ in r.content.iter_any():
                    pass

        tasks = [asyncio.create_task(one()) for _ in range(3)]
        await _wait_metrics(
            session,
            sim.url,
            lambda m: m["vllm:num_requests_running"] == 1 and m["vllm:num_requests_waiting"] == 2,
        )
        for task in tasks:  # cancelling closes each client's connection
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _wait_metrics(
            session,
            sim.url,
            lambda m: m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0,
        )
        # The freed slot serves the next request.
        small = {"prompt": "x", "max_tokens": 2}
        async with session.post(sim.url + "/v1/completions", json=small) as resp:
            assert resp.status == 200

    run(check)


def test_disconnect_mid_stream_cancels_generation(sim: Sim) -> None:
    async def check(session: aiohttp.ClientSession) -> None:
        payload = {"messages": [], "max_tokens": 100000, "stream": True}
        async with aiohttp.ClientSession() as own:
            resp = await own.post(sim.url + "/v1/chat/completions", json=payload)
            await resp.content.readuntil(b"\n\n")  # the stream has begun
            await _wait_metrics(session, sim.url, lambda m: m["vllm:num_requests_running"] == 1)
            resp.close()  # drop the connection mid-stream
        await _wait_metrics(session, sim.url, lambda m: m["vllm:num_requests_running"] == 0)

    run(check)


# --- embeddings, models, metrics -----------------------------------------------------------------


def test_embeddings_are_deterministic(sim: Sim) -> None:
    async def embed(session: aiohttp.ClientSession, payload: dict[str, Any]) -> dict[str, Any]:
        async with session.post(sim.url + "/v1/embeddings", json=payload) as resp:
            assert resp.status == 200
            return await resp.json()

    async def check(session: aiohttp.ClientSession) -> None:
        one = await embed(session, {"input": "hello"})
        again = await embed(session, {"input": ["hello", "world"]})
        assert one["object"] == "list" and one["data"][0]["object"] == "embedding"
        vector = one["data"][0]["embedding"]
        assert len(vector) == 16
        assert math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-9)
        assert [d["index"] for d in again["data"]] == [0, 1]
        assert again["data"][0]["embedding"] == vector
        assert again["data"][1]["embedding"] != vector
        wide = await embed(session, {"input": "hello", "dimensions": 64})
        assert len(wide["data"][0]["embedding"]) == 64
        assert one["usage"]["prompt_tokens"] >= 1
        async with session.post(sim.url + "/v1/embeddings", json={"input": []}) as resp:
            assert resp.status == 400

    run(check)
    # Deterministic across processes too: the vector is a function of the text only.
    assert simapi.embed("hello", 16) == simapi.embed("hello", 16)


def test_models_and_metrics(sim: Sim) -> None:
    async def check(session: aiohttp.ClientSession) -> None:
        async with session.get(sim.url + "/v1/models") as resp:
            body = await resp.json()
        assert [m["id"] for m in body["data"]] == ["simmy"]
        async with session.get(sim.url + "/metrics") as resp:
            text = await resp.text()
            assert resp.headers["Content-Type"].startswith("text/plain")
        assert "# TYPE vllm:num_requests_running gauge" in text
        assert 'vllm:num_requests_waiting{model_name="simmy"} 0.0' in text
        assert "vllm:generation_tokens_total" in text and "vllm:prompt_tokens_total" in text

    run(check)


# --- faults and signals --------------------------------------------------------------------------


def test_fail_at_start_exits_3() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gpud.sim.server", "--port", "0"],
        env={**os.environ, "GPUD_SIM_FAIL_AT_START": "1"},
        capture_output=True,
        timeout=DEADLINE_S,
    )
    assert proc.returncode == 3
    assert b"GPUD_SIM_FAIL_AT_START" in proc.stderr
    assert proc.stdout == b""


def test_hang_never_answers_and_still_stops_on_sigterm(start_sim: Callable[..., Sim]) -> None:
    sim = start_sim("--startup-s", "0", env={"GPUD_SIM_HANG": "1"})

    async def check(session: aiohttp.ClientSession) -> None:
        # Here the timeout is the condition under test: the connection is accepted, no answer comes.
        with pytest.raises(asyncio.TimeoutError):
            await session.get(sim.url + "/health", timeout=aiohttp.ClientTimeout(total=0.5))

    run(check)
    sim.proc.send_signal(signal.SIGTERM)
    assert sim.proc.wait(timeout=DEADLINE_S) == 0


def test_sigterm_exits_0_even_mid_stream(start_sim: Callable[..., Sim]) -> None:
    sim = start_sim("--startup-s", "0")

    async def check(session: aiohttp.ClientSession) -> None:
        payload = {"prompt": "x", "max_tokens": 100000, "stream": True}
        async with session.post(sim.url + "/v1/completions", json=payload) as resp:
            await resp.content.readuntil(b"\n\n")
            sim.proc.send_signal(signal.SIGTERM)
            with pytest.raises(aiohttp.ClientError):
                async for _ in resp.content.iter_any():
                    pass

    run(check)
    assert sim.proc.wait(timeout=DEADLINE_S) == 0


# --- pure formats --------------------------------------------------------------------------------


def test_stream_frames_survive_hostile_model_names() -> None:
    body = {"model": 'x@@TOKEN@@"\n\u00e9', "prompt": "p", "max_tokens": 3, "n": 2, "stream": True}
    job = simapi.parse_generation(body, chat=False, default_model="sim", now=0.0)
    frames = simapi.StreamFrames(job)
    raw = (frames.head() + frames.tokens(0, 3) + frames.tail()).decode()
    chunks = [json.loads(b[6:]) for b in raw.split("\n\n")[:-2]]
    assert len(chunks) == 6
    assert {c["model"] for c in chunks} == {body["model"]}
    assert [c["choices"][0]["index"] for c in chunks] == [0, 1] * 3
    assert [c["choices"][0]["finish_reason"] for c in chunks[-2:]] == ["length", "length"]
    assert simapi.escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_parse_generation_fields() -> None:
    chat = simapi.parse_generation(
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 9,
            "max_completion_tokens": 3,
        },
        chat=True,
        default_model="sim",
        now=5.0,
    )
    assert (chat.max_tokens, chat.model, chat.created, chat.choices) == (3, "sim", 5, 1)
    batch = simapi.parse_generation(
        {"prompt": [[1, 2, 3], [4]], "n": 2}, chat=False, default_model="m", now=0
    )
    assert (batch.prompt_tokens, batch.choices, batch.max_tokens) == (4, 4, 16)
    body = json.loads(simapi.full_response(batch))
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 64, "total_tokens": 68}
    for bad in ({"n": 65}, {"prompt": ["a"] * 33, "n": 2}, {"max_tokens": True}, {"stream_options": 1}):
        with pytest.raises(simapi.RequestError):
            simapi.parse_generation(bad, chat=False, default_model="m", now=0)
    with pytest.raises(simapi.RequestError):
        simapi.parse_generation({"messages": "hi"}, chat=True, default_model="m", now=0)


def test_embeddings_base64_matches_floats() -> None:
    job = simapi.parse_embeddings({"input": [1, 2, 3], "encoding_format": "base64", "dimensions": 8}, "m")
    (item,) = json.loads(simapi.embeddings_response(job))["data"]
    decoded = struct.unpack("<8f", base64.b64decode(item["embedding"]))
    assert all(
        math.isclose(a, b, rel_tol=1e-6) for a, b in zip(decoded, simapi.embed("[1,2,3]", 8), strict=True)
    )
    with pytest.raises(simapi.RequestError):
        simapi.parse_embeddings({"input": "x", "dimensions": 0}, "m")


# --- prefill and the prefix cache (SPEC §13) -----------------------------------------------------

PREFILL_MS_PER_1K = 1000.0  # big enough that a miss and a hit differ by far more than any jitter


async def _first_token_s(session: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any]) -> float:
    """Seconds from sending a streamed request to its first token's chunk; reads the stream to the end."""
    t0 = time.monotonic()
    async with session.post(url + path, json={**body, "stream": True, "max_tokens": 2}) as resp:
        assert resp.status == 200
        while True:
            frame = await resp.content.readuntil(b"\n\n")
            if b'"text":"' in frame or b'"content":" ' in frame:  # a token, not chat's role chunk
                break
        first = time.monotonic() - t0
        await resp.read()
    return first


def _at_least(measured: float, expected: float) -> bool:
    # The sleep never ends early by more than a clock tick. It may end late on a loaded machine, by how much
    # nobody can say: that a hit is cheaper than a miss is shown by their order and the counters instead.
    return expected - 0.005 <= measured


def _prefix_metrics(values: dict[str, float]) -> tuple[float, float]:
    return values["vllm:prefix_cache_queries_total"], values["vllm:prefix_cache_hits_total"]


def test_the_first_token_waits_exactly_for_the_uncached_prompt(start_sim: Callable[..., Sim]) -> None:
    sim = start_sim(
        "--startup-s", "0", "--ttft-ms", "10", "--itl-ms", "1",
        "--prefill-ms-per-1k-tokens", str(PREFILL_MS_PER_1K), "--prefix-cache-tokens", "100000",
    )  # fmt: skip
    prompt = "p" * 2400  # 600 tokens: 0.6 s of prefill on a miss
    shares_four_blocks = prompt[:1024] + "q" * 1376  # 600 tokens, 256 of them cached

    async def check(session: aiohttp.ClientSession) -> None:
        url, path = sim.url, "/v1/completions"
        assert _prefix_metrics(await _metrics(session, url)) == (0, 0)
        miss = await _first_token_s(session, url, path, {"prompt": prompt})
        assert _at_least(miss, 0.010 + 0.600), miss
        hit = await _first_token_s(session, url, path, {"prompt": prompt})
        assert _at_least(hit, 0.010), hit
        partial = await _first_token_s(session, url, path, {"prompt": shares_four_blocks})
        assert _at_least(partial, 0.010 + 0.344), partial
        assert hit < partial < miss, (hit, partial, miss)
        assert _prefix_metrics(await _metrics(session, url)) == (1800, 600 + 256)
        # Not streamed: the whole answer comes after the same first token plus the other tokens.
        t0 = time.monotonic()
        body = {"prompt": "r" * 1600, "max_tokens": 11}  # 400 tokens, a miss
        async with session.post(url + path, json=body) as resp:
            usage = (await resp.json())["usage"]
        assert _at_least(time.monotonic() - t0, 0.010 + 0.400 + 10 * 0.001)
        assert usage["prompt_tokens"] == 400
        values = await _metrics(session, url)
        assert _prefix_metrics(values) == (2200, 856)
        assert values["vllm:prompt_tokens_total"] == 2200

    run(check)


def test_a_chat_hits_the_turns_it_has_sent_before(start_sim: Callable[..., Sim]) -> None:
    sim = start_sim(
        "--startup-s", "0", "--ttft-ms", "10", "--itl-ms", "1",
        "--prefill-ms-per-1k-tokens", str(PREFILL_MS_PER_1K), "--prefix-cache-tokens", "100000",
    )  # fmt: skip
    system = {"role": "system", "content": "s" * 2048}  # "system: " + 2048 + "\n": 8 blocks and a bit
    first_turn = [system, {"role": "user", "content": "hello"}]
    second_turn = [*first_turn, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}]

    async def check(session: aiohttp.ClientSession) -> None:
        path = "/v1/chat/completions"
        first_text = simapi.chat_prompt_text(first_turn)
        second_text = simapi.chat_prompt_text(second_turn)
        miss = await _first_token_s(session, sim.url, path, {"messages": first_turn})
        assert _at_least(miss, 0.010 + math.ceil(len(first_text) / 4) / 1000), miss
        # The second turn starts with the first: only what follows its 8 whole blocks is prefilled.
        second = await _first_token_s(session, sim.url, path, {"messages": second_turn})
        uncached = math.ceil(len(second_text) / 4) - 8 * 64
        assert _at_least(second, 0.010 + uncached / 1000), second
        assert second < miss  # 512 cached tokens at 1 s per 1k are not prefilled again
        queries, hits = _prefix_metrics(await _metrics(session, sim.url))
        assert (queries, hits) == (math.ceil(len(first_text) / 4) + math.ceil(len(second_text) / 4), 512)

    run(check)


def test_without_a_cache_a_repeat_costs_the_full_prefill(start_sim: Callable[..., Sim]) -> None:
    sim = start_sim(
        "--startup-s", "0", "--ttft-ms", "10", "--itl-ms", "1",
        "--prefill-ms-per-1k-tokens", str(PREFILL_MS_PER_1K),
    )  # fmt: skip

    async def check(session: aiohttp.ClientSession) -> None:
        body = {"prompt": "p" * 1200}  # 300 tokens
        for _ in range(2):
            measured = await _first_token_s(session, sim.url, "/v1/completions", body)
            assert _at_least(measured, 0.010 + 0.300), measured
        values = await _metrics(session, sim.url)
        assert _prefix_metrics(values) == (0, 0)  # prefix caching off: vLLM counts no queries either
        assert values["vllm:prompt_tokens_total"] == 600

    run(check)


def test_prefix_cache_series_carry_the_model_name(sim: Sim) -> None:
    async def check(session: aiohttp.ClientSession) -> None:
        async with session.get(sim.url + "/metrics") as resp:
            text = await resp.text()
        for name in ("prefix_cache_queries_total", "prefix_cache_hits_total"):
            assert f"# TYPE vllm:{name} counter" in text
            assert f'vllm:{name}{{model_name="simmy"}} 0.0' in text

    run(check)


@pytest.mark.parametrize(
    "args",
    [
        ["--prefix-cache-tokens", "-1"],
        ["--prefix-cache-tokens", "1.5"],
        ["--prefill-ms-per-1k-tokens", "nan"],
        ["--prefill-ms-per-1k-tokens", "-3"],
    ],
)
def test_the_server_refuses_bad_prefix_flags(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        simserver.parse_args(args)
    assert info.value.code == 2 and args[0] in capsys.readouterr().err
    parsed = simserver.parse_args(["--prefill-ms-per-1k-tokens", "2.5", "--prefix-cache-tokens", "10"])
    assert (parsed.prefill_ms_per_1k_tokens, parsed.prefix_cache_tokens) == (2.5, 10)
    defaults = simserver.parse_args([])
    assert (defaults.prefill_ms_per_1k_tokens, defaults.prefix_cache_tokens) == (0.0, 0)
