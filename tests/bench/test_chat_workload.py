"""bench/chat_workload.py: the routing benchmark's workloads, their capacity estimate, and the replay client."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import chat_workload as cw  # noqa: E402 - bench/ is not a package; its path is set up above

from gpud.sim.prefix import Prefill, prompt_tokens  # noqa: E402

SMALL = cw.ChatShape(
    conversations=6, turns=(2, 4), groups=2, system_chars=(1000, 2000), user_chars=(50, 300),
    max_tokens=(2, 4), active=3,
)  # fmt: skip


def conversations(workload: cw.Workload) -> dict[str, list[cw.Request]]:
    by_session: dict[str, list[cw.Request]] = {}
    for request in workload.requests:
        assert request.session is not None
        by_session.setdefault(request.session, []).append(request)
    return by_session


# --- the chat workload ---------------------------------------------------------------------------------------


def test_a_seed_makes_one_workload() -> None:
    assert cw.chat_workload(5, 10.0, SMALL) == cw.chat_workload(5, 10.0, SMALL)
    assert cw.chat_workload(5, 10.0, SMALL) != cw.chat_workload(6, 10.0, SMALL)
    assert cw.mix_workload(5, 20.0, 5.0) == cw.mix_workload(5, 20.0, 5.0)


def test_each_turn_is_every_earlier_message_and_a_new_one() -> None:
    workload = cw.chat_workload(2, 10.0)
    by_session = conversations(workload)
    assert len(by_session) == cw.ChatShape.conversations
    for turns in by_session.values():
        assert [r.turn for r in turns] == list(range(1, len(turns) + 1))
        assert cw.ChatShape.turns[0] <= len(turns) <= cw.ChatShape.turns[1]
        first = turns[0].body["messages"]
        assert [m["role"] for m in first] == ["system", "user"]
        for before, after in zip(turns, turns[1:], strict=False):
            earlier, reply = after.body["messages"][:-2], after.body["messages"][-2]
            assert earlier == before.body["messages"] and after.body["messages"][-1]["role"] == "user"
            assert reply["role"] == "assistant" and len(reply["content"]) == 4 * before.max_tokens
            assert after.prompt_text().startswith(before.prompt_text())
            assert after.at > before.at


def test_long_system_prompts_are_shared_by_groups_of_conversations() -> None:
    workload = cw.chat_workload(3, 10.0)
    systems: dict[str, set[str]] = {}
    for request in workload.requests:
        systems.setdefault(request.body["messages"][0]["content"], set()).add(str(request.session))
    assert len(systems) == cw.ChatShape.groups == len(workload.system_chars)
    assert all(3000 <= len(text) <= 8000 for text in systems)  # several KB each
    assert all(len(sessions) == cw.ChatShape.conversations // cw.ChatShape.groups for sessions in systems.values())
    total, repeated, system = cw.shared_prefix_tokens(workload)
    assert 0 < system < repeated < total  # both the system prompts and the earlier turns repeat


def test_arrivals_are_poisson_at_the_rate() -> None:
    workload = cw.chat_workload(4, 20.0)
    times = [r.at for r in workload.requests]
    assert times == sorted(times) and times[0] > 0
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 20.0, rel=0.15)
    # Exponential gaps: the standard deviation is about the mean (a fixed pace would give 0).
    assert statistics.stdev(gaps) == pytest.approx(1 / 20.0, rel=0.25)
    with pytest.raises(ValueError):
        cw.chat_workload(4, 0.0)


def test_the_mix_is_90_10_with_no_shared_prefix() -> None:
    workload = cw.mix_workload(1, 50.0, 20.0)
    kinds = [r.kind for r in workload.requests]
    assert kinds.count("long") / len(kinds) == pytest.approx(0.1, abs=0.03)
    assert {r.max_tokens for r in workload.requests} == {4, 200}
    assert all(r.session is None and r.path == cw.COMPLETIONS_PATH for r in workload.requests)
    assert workload.requests[-1].at < 20.0
    total, repeated, _ = cw.shared_prefix_tokens(workload)
    assert total > 0 and repeated == 0


# --- capacity ------------------------------------------------------------------------------------------------


def test_capacity_is_littles_law_over_the_sims_own_prefill() -> None:
    sim = cw.SimParams(ttft_ms=10, itl_ms=2, prefill_ms_per_1k_tokens=100, prefix_cache_tokens=100_000,
                       max_num_seqs=4)  # fmt: skip
    workload = cw.chat_workload(1, 10.0, SMALL)
    prefill = Prefill(100, 0)
    cold = [0.010 + prefill.run([r.prompt_text()]) + (r.max_tokens - 1) * 0.002 for r in workload.requests]
    assert cw.estimate_capacity(workload, 3, sim, "cold") == pytest.approx(3 * 4 / statistics.fmean(cold))
    one = Prefill(100, 100_000)  # one replica: every placement is the same replica
    warm = [0.010 + one.run([r.prompt_text()]) + (r.max_tokens - 1) * 0.002 for r in workload.requests]
    assert cw.estimate_capacity(workload, 1, sim, "random") == pytest.approx(4 / statistics.fmean(warm))
    big = cw.chat_workload(1, 10.0)
    cold_c, random_c, sticky_c = (cw.estimate_capacity(big, 3, cw.SimParams(), p) for p in ("cold", "random", "sticky"))
    assert cold_c < random_c < sticky_c
    assert sim.args() == ["--ttft-ms", "10", "--itl-ms", "2", "--prefill-ms-per-1k-tokens", "100",
                          "--prefix-cache-tokens", "100000", "--max-num-seqs", "4"]  # fmt: skip


def test_describe_prints_the_shape() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chat_workload.py"), "--describe", "--conversations", "12"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "chat workload, seed 1" in out and "conversations 12" in out and "system prompts 6" in out
    assert "shared-prefix fraction" in out and "mix workload" in out and "capacity of 3 sim replicas" in out


# --- replay --------------------------------------------------------------------------------------------------


def test_replay_sends_sessions_streams_and_survives_failures() -> None:
    seen: list[tuple[str | None, dict[str, Any]]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append((request.headers.get(cw.SESSION_HEADER), body))
        if len(seen) == 2:
            return web.Response(status=500, text="boom")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Sim-Pid": "42"})
        await resp.prepare(request)
        role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        token = {"choices": [{"index": 0, "delta": {"content": " hi"}}]}
        await resp.write(b"data: " + json.dumps(role).encode() + b"\n\n")
        await asyncio.sleep(0.05)
        await resp.write(b"data: " + json.dumps(token).encode() + b"\n\ndata: [DONE]\n\n")
        return resp

    async def main() -> list[cw.Result]:
        app = web.Application()
        app.router.add_post(cw.CHAT_PATH, handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            workload = cw.chat_workload(1, 50.0, SMALL)
            return await cw.replay(workload, f"http://127.0.0.1:{port}", "the-model", start_delay_s=0.0)
        finally:
            await runner.cleanup()

    results = asyncio.run(main())
    workload = cw.chat_workload(1, 50.0, SMALL)
    assert len(seen) == len(results) == len(workload.requests)
    assert all(body["model"] == "the-model" and body["stream"] is True for _, body in seen)
    assert {s for s, _ in seen} == {r.session for r in workload.requests}
    assert [r.status for r in results].count(500) == 1
    failed = next(r for r in results if r.status == 500)
    assert failed.error == "boom" and failed.ttft is None
    ok = [r for r in results if r.status == 200]
    # The role chunk is not a token: the first token comes after the 50 ms pause.
    assert all(r.ttft is not None and r.latency is not None and 0.05 <= r.ttft <= r.latency for r in ok)
    assert all(r.replica == "42" and r.events == 2 for r in ok)
    summary = cw.summarize(results)
    assert (summary["requests"], summary["ok"], summary["failed"]) == (len(results), len(ok), 1)
    assert summary["ttft_p50_ms"] >= 50 and summary["throughput_rps"] > 0


@pytest.fixture
def sim_server() -> Iterator[tuple[str, int]]:
    """A plain sim server (no gpud) with the prefix cache on: its URL and pid."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpud.sim.server", "--port", "0", "--startup-s", "0", "--ttft-ms", "2",
         "--itl-ms", "1", "--prefill-ms-per-1k-tokens", "20", "--prefix-cache-tokens", "1000000"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert line.startswith("simserver listening on "), line
    yield "http://127.0.0.1:" + line.rsplit(":", 1)[1].strip(), proc.pid
    proc.kill()
    proc.wait()
    proc.stdout.close()


def test_a_sim_replica_that_sees_a_conversation_again_hits_its_cache(sim_server: tuple[str, int]) -> None:
    url, pid = sim_server
    workload = cw.chat_workload(7, 40.0, SMALL)

    async def main() -> tuple[list[cw.Result], tuple[float, float], list[cw.Result], tuple[float, float]]:
        first = await cw.replay(workload, url, "m", start_delay_s=0.0)
        after_first = await cw.prefix_cache_counters([url])
        again = await cw.replay(workload, url, "m", start_delay_s=0.0)
        return first, after_first, again, await cw.prefix_cache_counters([url])

    first, (queries, hits), again, (queries2, hits2) = asyncio.run(main())
    assert all(r.status == 200 and r.ttft is not None and r.replica == str(pid) for r in first + again)
    # One replica, a cache bigger than the workload: it hits exactly what the workload repeats.
    total, repeated, _ = cw.shared_prefix_tokens(workload)
    assert (queries, hits) == (total, repeated)
    assert total == sum(prompt_tokens(r.prompt_text()) for r in workload.requests)
    assert hits > 0.5 * queries
    # Seen once already: every prompt is a full hit the second time.
    assert queries2 - queries == total and hits2 - hits == total
    # A turn was sent only after the turn before it had ended.
    ends: dict[str | None, float] = {}
    for result in first:
        assert result.due >= ends.get(result.session, 0.0)
        ends[result.session] = result.end
