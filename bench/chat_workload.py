"""Workloads for the routing benchmark (issue 13, SPEC §13), and a small async client that replays them.

    python bench/chat_workload.py --describe [--seed 1] [--rate 10] [--conversations 48] [--replicas 3]
    python bench/chat_workload.py --replay http://127.0.0.1:8000 --model m [--mix] [--rate 10]

As a library (`sys.path.insert(0, "bench")`; it imports gpud's pure sim modules from the checkout):

- `chat_workload(seed, rate, shape)`: a multi-turn chat workload. `shape.conversations` conversations, each of
  `shape.turns` turns; a turn is all earlier messages (the system prompt, the user and assistant turns) plus a
  new user message. Long system prompts (several KB) are shared by groups of conversations. Requests arrive
  as a Poisson process at `rate` per second; each arrival is the next turn of one of `shape.active`
  conversations in progress (picked at random), so a conversation's turns are spread out and interleaved
  with others', as a chat service sees them. The assistant messages of earlier turns are synthetic text of
  4 × max_tokens characters (what a reply of max_tokens tokens would weigh): the workload is fixed before
  it is replayed, the same for every router, and its prefixes do not depend on what a server answered.
- `mix_workload(seed, rate, duration_s)`: the proxy benchmark's 90/10 mix (90 % short completions of 4
  tokens, 10 % long ones of 200) with no shared prefixes: every prompt is unique from its first block.
- `replay(workload, base_url, model)`: sends each request streamed at its time with aiohttp (the conversation
  id as `X-Session-ID`), waiting for the previous turn of the same conversation to finish first (a user
  answers what they read). Returns a `Result` per request: status, TTFT and latency measured from when the
  request was due (its arrival, or its previous turn's end if later), so a lagging client cannot hide queueing,
  and the `X-Sim-Pid` of the replica that answered.
- `estimate_capacity(workload, replicas, sim, placement)`: requests per second that N sim replicas sustain
  for the workload (Little's law: replicas × max-num-seqs / mean service time, the service time computed
  with gpud's own prefix cache model), so a benchmark can run at ~60 % of it. `placement` says which replica
  serves each request for the cache: "random" (what least connections or round-robin amount to for a
  cache), "sticky" (each conversation on one replica) or "cold" (no hit at all).
- `summarize(results)`, `prefix_cache_counters(urls)`: TTFT/latency percentiles and throughput; the sum of
  the replicas' `vllm:prefix_cache_queries_total` and `…_hits_total`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpud.sim.api import chat_prompt_text  # noqa: E402 - after the path setup above
from gpud.sim.prefix import BLOCK_CHARS, Prefill, PrefixCache, tokens_of  # noqa: E402

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
SESSION_HEADER = "X-Session-ID"
_WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an not which have but all "
    "they one more can their were been has would when will there what so if about into other its only some "
    "time could these two may then first any new like our over such after most also made well between "
    "model request replica cache prefix token stream server router session memory latency queue batch "
    "prompt answer system user assistant context window block hash table policy load balance throughput"
).split()

Placement = Literal["cold", "random", "sticky"]


@dataclass(frozen=True)
class Request:
    """One request of a workload: when it is sent, where, and its body (without "model" and "stream")."""

    at: float  # seconds after the start of the replay
    path: str
    body: dict[str, Any]
    max_tokens: int
    kind: str  # "chat", "short" or "long"
    session: str | None = None  # the conversation, sent as X-Session-ID; None: no header
    turn: int = 0  # 1-based turn of the conversation; 0 outside chats

    def prompt_text(self) -> str:
        """The prompt text as the sim engine sees it (its prefix cache keys this)."""
        if self.path == CHAT_PATH:
            return chat_prompt_text(self.body["messages"])
        return str(self.body["prompt"])


@dataclass(frozen=True)
class Workload:
    name: str
    seed: int
    rate: float
    requests: tuple[Request, ...]
    system_chars: tuple[int, ...] = ()  # the length of each shared system prompt (chat only)


@dataclass(frozen=True)
class ChatShape:
    """The shape of a chat workload; every range is inclusive and drawn uniformly."""

    conversations: int = 48
    turns: tuple[int, int] = (6, 16)
    groups: int = 6  # system prompts, each shared by the conversations of its group
    system_chars: tuple[int, int] = (3000, 8000)
    user_chars: tuple[int, int] = (100, 800)
    max_tokens: tuple[int, int] = (64, 256)  # also sizes the synthetic reply the next turn carries
    active: int = 16  # conversations in progress at once


@dataclass(frozen=True)
class SimParams:
    """The sim engine args of the replicas a workload is replayed against."""

    ttft_ms: float = 20.0
    itl_ms: float = 5.0
    prefill_ms_per_1k_tokens: float = 200.0
    prefix_cache_tokens: int = 200_000
    max_num_seqs: int = 4

    def args(self) -> list[str]:
        """The engine args for `gpud model start … --engine sim -- ARGS` or `python -m gpud.sim.server`."""
        return [
            "--ttft-ms", f"{self.ttft_ms:g}", "--itl-ms", f"{self.itl_ms:g}",
            "--prefill-ms-per-1k-tokens", f"{self.prefill_ms_per_1k_tokens:g}",
            "--prefix-cache-tokens", str(self.prefix_cache_tokens), "--max-num-seqs", str(self.max_num_seqs),
        ]  # fmt: skip


# -- generation -----------------------------------------------------------------------------------------------


def _text(rng: random.Random, chars: int, head: str = "") -> str:
    """`chars` characters of words; `head` first (it makes a text unique from its first block on)."""
    parts = [head] if head else []
    size = len(head)  # of " ".join(parts)
    while size < chars:
        word = rng.choice(_WORDS)
        size += len(word) + (1 if parts else 0)
        parts.append(word)
    return " ".join(parts)[:chars]


def _poisson(rng: random.Random, rate: float) -> Iterable[float]:
    if not rate > 0:
        raise ValueError(f"the arrival rate must be positive, got {rate}")
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t


def chat_workload(seed: int = 1, rate: float = 10.0, shape: ChatShape | None = None) -> Workload:
    """A seeded multi-turn chat workload arriving at `rate` requests per second (see the module docstring)."""
    shape = shape or ChatShape()
    rng = random.Random(seed)
    systems = [
        _text(rng, rng.randint(*shape.system_chars), f"You are assistant {g} of workload {seed}.")
        for g in range(shape.groups)
    ]
    pending = list(range(shape.conversations))
    turns = {c: rng.randint(*shape.turns) for c in pending}
    history: dict[int, list[dict[str, str]]] = {}
    done: dict[int, int] = {}
    active: list[int] = []
    requests: list[Request] = []
    arrivals = iter(_poisson(rng, rate))
    while pending or active:
        while pending and len(active) < shape.active:
            c = pending.pop(0)
            active.append(c)
            history[c] = [{"role": "system", "content": systems[c % shape.groups]}]
            done[c] = 0
        c = rng.choice(active)
        max_tokens = rng.randint(*shape.max_tokens)
        user = {"role": "user", "content": _text(rng, rng.randint(*shape.user_chars), f"[{seed}/{c}]")}
        messages = [*history[c], user]
        done[c] += 1
        requests.append(
            Request(
                at=next(arrivals),
                path=CHAT_PATH,
                body={"messages": messages, "max_tokens": max_tokens},
                max_tokens=max_tokens,
                kind="chat",
                session=f"conv-{seed}-{c}",
                turn=done[c],
            )
        )
        # The reply this turn gets, as the next turn will carry it: max_tokens tokens of text.
        history[c] = [*messages, {"role": "assistant", "content": _text(rng, 4 * max_tokens)}]
        if done[c] == turns[c]:
            active.remove(c)
            del history[c]
    return Workload("chat", seed, rate, tuple(requests), tuple(len(s) for s in systems))


def mix_workload(seed: int = 3, rate: float = 50.0, duration_s: float = 30.0) -> Workload:
    """90 % short (4 tokens) / 10 % long (200 tokens) completions, every prompt unique from its first block."""
    rng = random.Random(seed)
    requests: list[Request] = []
    for i, at in enumerate(_poisson(rng, rate)):
        if at >= duration_s:
            break
        long = rng.random() < 0.1
        max_tokens = 200 if long else 4
        prompt = _text(rng, rng.randint(100, 400), f"[{seed}/{i}]")
        requests.append(
            Request(at, COMPLETIONS_PATH, {"prompt": prompt, "max_tokens": max_tokens}, max_tokens,
                    "long" if long else "short")  # fmt: skip
        )
    return Workload("mix", seed, rate, tuple(requests))


# -- what the sim makes of it ---------------------------------------------------------------------------------


def _replica_of(request: Request, replicas: int, placement: Placement, rng: random.Random) -> int:
    if placement == "sticky" and request.session is not None:
        return zlib.crc32(request.session.encode()) % replicas
    return rng.randrange(replicas)


def service_times(
    workload: Workload, replicas: int, sim: SimParams, placement: Placement = "random", seed: int = 0
) -> list[float]:
    """Seconds each request holds a sequence slot on its replica: ttft + prefill + the other tokens' itl.

    The prefill is what gpud's sim engine would charge (gpud.sim.prefix), each replica's cache fed in
    arrival order with the requests `placement` sends it.
    """
    rng = random.Random(seed)
    cache_tokens = 0 if placement == "cold" else sim.prefix_cache_tokens
    fleet = [Prefill(sim.prefill_ms_per_1k_tokens, cache_tokens) for _ in range(replicas)]
    times = []
    for request in workload.requests:
        prefill = fleet[_replica_of(request, replicas, placement, rng)].run([request.prompt_text()])
        times.append(sim.ttft_ms / 1000 + prefill + (request.max_tokens - 1) * sim.itl_ms / 1000)
    return times


def estimate_capacity(
    workload: Workload, replicas: int, sim: SimParams, placement: Placement = "random", seed: int = 0
) -> float:
    """Requests per second `replicas` sim replicas sustain for this workload's mix of requests.

    Little's law: each replica runs at most max-num-seqs requests at once, each for its service time,
    so the fleet completes replicas × max-num-seqs / mean service time requests per second at best.
    """
    times = service_times(workload, replicas, sim, placement, seed)
    return replicas * sim.max_num_seqs / statistics.fmean(times)


def shared_prefix_tokens(workload: Workload) -> tuple[int, int, int]:
    """(prompt tokens, of which a prefix sent before in the workload, of which inside the system prompt).

    The hit counts of one replica with an unbounded cache seeing every request in order: the most any
    routing can reach. The system-prompt part is the cached tokens up to the last whole block of the
    request's system message (shared with the other conversations of its group, or with its own earlier
    turns); the rest of the repeated part is the conversation's own history.
    """
    cache = PrefixCache(10**12)
    total = repeated = system = 0
    for request in workload.requests:
        found = cache.admit(request.prompt_text())
        total += found.prompt_tokens
        repeated += found.cached_tokens
        if request.path == CHAT_PATH:
            head = chat_prompt_text(request.body["messages"][:1])
            system += min(found.cached_tokens, tokens_of(len(head) // BLOCK_CHARS * BLOCK_CHARS))
    return total, repeated, system


# -- replay ---------------------------------------------------------------------------------------------------


@dataclass
class Result:
    """What one replayed request got. Times are seconds from when it was due; None when it never came."""

    index: int
    kind: str
    session: str | None
    status: int  # the HTTP status; 0 when the connection failed
    ttft: float | None = None
    latency: float | None = None
    due: float = 0.0  # loop time at which the request was due
    end: float = 0.0
    replica: str | None = None  # X-Sim-Pid of the replica that answered
    error: str | None = None
    events: int = field(default=0)  # SSE data events received, [DONE] excluded


def _is_token(event: dict[str, Any]) -> bool:
    for choice in event.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


async def _send(http: Any, url: str, request: Request, model: str, headers: dict[str, str], result: Result) -> None:
    loop = asyncio.get_running_loop()
    body = {**request.body, "model": model, "stream": True}
    async with http.post(url + request.path, json=body, headers=headers) as resp:
        result.status = resp.status
        result.replica = resp.headers.get("X-Sim-Pid")
        if resp.status != 200:
            result.error = (await resp.text())[:200]
            return
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                break
            result.events += 1
            if result.ttft is None and _is_token(json.loads(payload)):
                result.ttft = loop.time() - result.due
    result.latency = loop.time() - result.due


async def replay(
    workload: Workload,
    base_url: str,
    model: str,
    *,
    session_header: bool = True,
    ordered: bool = True,
    timeout_s: float = 300.0,
    start_delay_s: float = 0.2,
) -> list[Result]:
    """Replay `workload` against `base_url` (an OpenAI-compatible server, or gpud's proxy); a Result each.

    `ordered`: a conversation's turn waits for its previous turn to end (its due time is then that end).
    `session_header`: send the conversation id as X-Session-ID. Requests fail alone (status 0 or the HTTP
    status), never the replay.
    """
    import aiohttp

    loop = asyncio.get_running_loop()
    results = [Result(i, r.kind, r.session, 0) for i, r in enumerate(workload.requests)]
    previous: dict[str, asyncio.Future[float]] = {}
    base_url = base_url.rstrip("/")

    async def one(http: aiohttp.ClientSession, request: Request, result: Result, after: asyncio.Future[float] | None,
                  finished: asyncio.Future[float]) -> None:  # fmt: skip
        try:
            scheduled = start + request.at
            await asyncio.sleep(max(0.0, scheduled - loop.time()))
            result.due = max(scheduled, await after) if after is not None else scheduled
            headers = {SESSION_HEADER: request.session} if session_header and request.session else {}
            try:
                await _send(http, base_url, request, model, headers, result)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                result.error = f"{type(exc).__name__}: {exc}"
            result.end = loop.time()
        finally:
            finished.set_result(loop.time())

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        start = loop.time() + start_delay_s
        tasks = []
        for request, result in zip(workload.requests, results, strict=True):
            finished: asyncio.Future[float] = loop.create_future()
            after = previous.get(request.session) if ordered and request.session else None
            if request.session:
                previous[request.session] = finished
            tasks.append(asyncio.create_task(one(http, request, result, after, finished)))
        await asyncio.gather(*tasks)
    return results


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarize(results: Sequence[Result], kinds: Iterable[str] | None = None) -> dict[str, float]:
    """Counts, TTFT and latency (mean, p50, p99, in ms) and throughput of the results of these kinds."""
    wanted = set(kinds) if kinds is not None else None
    chosen = [r for r in results if wanted is None or r.kind in wanted]
    ok = [r for r in chosen if r.status == 200 and r.latency is not None and r.ttft is not None]
    ttft = [r.ttft * 1000 for r in ok if r.ttft is not None]
    latency = [r.latency * 1000 for r in ok if r.latency is not None]
    span = max((r.end for r in ok), default=0.0) - min((r.due for r in ok), default=0.0)
    return {
        "requests": len(chosen),
        "ok": len(ok),
        "failed": len(chosen) - len(ok),
        "ttft_mean_ms": statistics.fmean(ttft) if ttft else math.nan,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "latency_p50_ms": percentile(latency, 50),
        "latency_p99_ms": percentile(latency, 99),
        "throughput_rps": len(ok) / span if span > 0 else math.nan,
    }


async def prefix_cache_counters(urls: Iterable[str]) -> tuple[float, float]:
    """The sum over these servers of vllm:prefix_cache_queries_total and vllm:prefix_cache_hits_total."""
    import aiohttp

    queries = hits = 0.0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for url in urls:
            async with http.get(url.rstrip("/") + "/metrics") as resp:
                text = await resp.text()
            for line in text.splitlines():
                name, _, value = line.partition("{")
                if name == "vllm:prefix_cache_queries_total":
                    queries += float(value.rsplit(" ", 1)[1])
                elif name == "vllm:prefix_cache_hits_total":
                    hits += float(value.rsplit(" ", 1)[1])
    return queries, hits


# -- the command line -----------------------------------------------------------------------------------------


def _spread(values: Sequence[float]) -> str:
    return f"p50 {percentile(values, 50):,.0f}, p90 {percentile(values, 90):,.0f}, max {max(values):,.0f}"


def describe(workload: Workload, replicas: int, sim: SimParams) -> list[str]:
    """The shape of a workload in words: what the benchmark's reader needs to judge it."""
    requests = workload.requests
    chars = [len(r.prompt_text()) for r in requests]
    total, repeated, system = shared_prefix_tokens(workload)
    lines = [f"{workload.name} workload, seed {workload.seed}: {len(requests)} requests at {workload.rate:g}/s "
             f"(Poisson) over {requests[-1].at:.1f} s"]  # fmt: skip
    if workload.name == "chat":
        turns: dict[str, int] = {}
        for r in requests:
            turns[str(r.session)] = max(turns.get(str(r.session), 0), r.turn)
        groups = len(workload.system_chars)
        lines += [
            f"  conversations {len(turns)}, turns each: min {min(turns.values())}, "
            f"mean {statistics.fmean(turns.values()):.1f}, max {max(turns.values())}",
            f"  system prompts {groups}, shared by ~{len(turns) / groups:.0f} conversations each: "
            f"{min(workload.system_chars) / 1000:.1f}–{max(workload.system_chars) / 1000:.1f} KB",
        ]
    else:
        kinds = {k: sum(r.kind == k for r in requests) for k in ("short", "long")}
        lines.append(f"  short (4 tokens) {kinds['short']}, long (200 tokens) {kinds['long']}")
    lines += [
        f"  prompt characters: {_spread(chars)} (tokens = characters / 4)",
        f"  max_tokens: {_spread([r.max_tokens for r in requests])}",
        f"  shared-prefix fraction: {repeated / total:.2f} of {total:,} prompt tokens repeat a prefix sent before "
        f"({system / total:.2f} in system prompts, {(repeated - system) / total:.2f} beyond them: earlier turns)",
        f"  capacity of {replicas} sim replica{'s' if replicas != 1 else ''} ({' '.join(sim.args())}), req/s: "
        + ", ".join(f"{p} {estimate_capacity(workload, replicas, sim, p):.1f}" for p in ("cold", "random", "sticky")),
    ]
    return lines


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--describe", action="store_true", help="print the shape of both workloads")
    what.add_argument("--replay", metavar="URL", help="replay the chat workload (or --mix) against URL")
    parser.add_argument("--model", default="m", help="the model name sent in each body (--replay)")
    parser.add_argument("--mix", action="store_true", help="replay the 90/10 mix instead of the chat")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=10.0, help="arrivals per second")
    parser.add_argument("--conversations", type=int, default=ChatShape.conversations)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of the mix")
    parser.add_argument("--replicas", type=int, default=3, help="for the capacity estimate")
    parser.add_argument("--metrics", metavar="URL,…", help="after --replay, the prefix-cache hit rate of these")
    args = parser.parse_args(argv)
    chat = chat_workload(args.seed, args.rate, ChatShape(conversations=args.conversations))
    mix = mix_workload(args.seed, args.rate, args.duration)
    if args.describe:
        for workload in (chat, mix):
            print("\n".join(describe(workload, args.replicas, SimParams())))
        return 0
    workload = mix if args.mix else chat
    results = _run(replay(workload, args.replay, args.model))
    for key, value in summarize(results).items():
        print(f"{key:>16} {value:,.1f}")
    failed = [r for r in results if r.status != 200 or r.error]
    for r in failed[:3]:
        print(f"request {r.index} failed: status {r.status}, {r.error}", file=sys.stderr)
    if args.metrics:
        queries, hits = _run(prefix_cache_counters(args.metrics.split(",")))
        print(f"prefix cache: {hits:,.0f} of {queries:,.0f} prompt tokens hit ({hits / max(queries, 1):.2f})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
