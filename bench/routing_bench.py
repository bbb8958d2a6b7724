"""Routing benchmark (issue #13): gpud's least-conn, session and prefix policies side by side with nginx
round-robin and vllm-router's cache_aware, on a multi-turn chat workload over sim replicas with a prefix cache.

    .venv/bin/python bench/routing_bench.py [--conversations 48] [--load 0.6] [--vllm-router PATH]
                                            [--mix-rate 50] [--mix-duration 30] [--write docs/benchmarks.md]

The replicas: gpud's sim engine with `--prefill-ms-per-1k-tokens 200 --prefix-cache-tokens 200000
--max-num-seqs 4` (bench/chat_workload.py SimParams): a prompt's uncached part costs 200 ms per 1k tokens
before the first token, exactly (gpud.sim.prefix), so where a request lands decides its TTFT. Each target gets
its own 3 fresh replicas (cold caches), started as models of one gpud daemon.

1. The chat workload (bench/chat_workload.py): conversations whose every turn resends the history, long system
   prompts shared by groups, Poisson arrivals at `--load` × the fleet's estimated capacity under random
   placement; replayed through each target. TTFT mean/p50/p99, throughput, and the replicas' prefix-cache hit
   rate (their vllm:prefix_cache_hits_total / queries_total).
2. The 90/10 short/long mix with no shared prefixes, through gpud least-conn and gpud prefix: the short
   requests' p99 (prefix routing must not make balancing worse where it has nothing to win).
3. Proxy workers: the chat workload through prefix routing with 2 workers, each keeping its own table; the hit
   rate against 1 worker.
4. Memory: the proxy worker's RSS while `--flat-requests` requests with unique long prompts go through prefix
   routing (far more blocks than the table's bound): it must level off, not grow.

Targets: prefix mean TTFT ≤ 0.5× gpud least-conn and ≤ 1.0× vllm-router cache_aware; prefix throughput within
10 % of least-conn; on the mix, prefix short p99 ≤ 1.1× least-conn; flat worker RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import benchdoc  # noqa: E402
import psutil  # noqa: E402
from benchdaemon import BenchDaemon, running_daemon  # noqa: E402
from chat_workload import (  # noqa: E402
    ChatShape,
    SimParams,
    Workload,
    chat_workload,
    estimate_capacity,
    mix_workload,
    prefix_cache_counters,
    replay,
    summarize,
)
from proxy_bench import free_port, processes, start_nginx, wait_answering  # noqa: E402

from gpud.cli.client import model_path  # noqa: E402

SIM = SimParams()


def start_models(daemon: BenchDaemon, models: dict[str, str | None], sim: SimParams) -> dict[str, list[int]]:
    """Start these models (name → routing, None for least-conn) of 3 sim replicas each; their replicas' ports."""
    for name, routing in models.items():
        body: dict[str, Any] = {"name": name, "model": name, "engine": "sim", "replicas": 3, "vram": "1GiB",
                                "args": ["--startup-s", "0", *sim.args()]}
        if routing:
            body["routing"] = routing
        daemon.client.request("POST", "/v1/models", body)
    ports: dict[str, list[int]] = {}
    deadline = time.monotonic() + 60
    for name in models:
        while True:
            shown = daemon.client.request("GET", model_path(name))
            if shown["replicas_ready"] == 3 and not shown["busy"]:
                ports[name] = [r["port"] for r in shown["replicas"]]
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"model {name} did not become ready: {shown}")
            time.sleep(0.1)
    return ports


def start_cache_aware(procs: list[subprocess.Popen[bytes]], binary: str, backends: list[int]) -> int:
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--host", "127.0.0.1", "--port", str(port), "--policy", "cache_aware", "--log-level", "warning",
         "--worker-urls", *(f"http://127.0.0.1:{p}" for p in backends)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(proc)
    wait_answering(f"http://127.0.0.1:{port}/v1/completions", proc, "vllm-router", timeout=60)
    return port


def run_chat(workload: Workload, url: str, model: str, replicas: list[int], session_header: bool) -> dict[str, float]:
    async def go() -> tuple[list[Any], tuple[float, float]]:
        before = await prefix_cache_counters(f"http://127.0.0.1:{p}" for p in replicas)
        results = await replay(workload, url, model, session_header=session_header)
        after = await prefix_cache_counters(f"http://127.0.0.1:{p}" for p in replicas)
        return results, (after[0] - before[0], after[1] - before[1])

    results, (queries, hits) = asyncio.run(go())
    summary = summarize(results)
    summary["hit_rate"] = hits / queries if queries else float("nan")
    return summary


def worker_rss(daemon: BenchDaemon) -> int:
    root = psutil.Process(daemon.proc.pid)
    return sum(p.memory_info().rss for p in root.children() if "gpud.proxy.worker" in " ".join(p.cmdline()))


async def flat_load(port: int, model: str, requests: int, chars: int, samples: int,
                    rss: Any) -> list[tuple[int, int]]:
    """Send `requests` completions with unique prompts through the proxy, 64 at a time; (sent, RSS) samples."""
    import aiohttp

    out = [(0, rss())]
    sent = 0
    step = max(1, requests // samples)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
        async def one(i: int) -> None:
            prompt = f"unique prompt {i} " + "z" * chars
            async with http.post(f"http://127.0.0.1:{port}/v1/completions",
                                 json={"model": model, "prompt": prompt, "max_tokens": 1}) as r:
                await r.read()

        while sent < requests:
            batch = min(step, requests - sent)
            await asyncio.gather(*(one(sent + i) for i in range(batch)))
            sent += batch
            out.append((sent, rss()))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=48)
    parser.add_argument("--load", type=float, default=0.6, help="arrival rate as a fraction of the capacity")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mix-rate", type=float, default=50.0)
    parser.add_argument("--mix-duration", type=float, default=30.0)
    parser.add_argument("--flat-requests", type=int, default=20_000)
    parser.add_argument("--vllm-router", metavar="PATH", help="the vllm-router binary (default: on PATH)")
    parser.add_argument("--write", metavar="FILE", help="replace the 'Routing' section of this Markdown file")
    args = parser.parse_args()
    if shutil.which("nginx") is None:
        print("Missing nginx: install with `apt-get install -y nginx`.", file=sys.stderr)
        return 1
    router = args.vllm_router or shutil.which("vllm-router")
    shape = replace(ChatShape(), conversations=args.conversations)
    capacity = estimate_capacity(chat_workload(args.seed, 1.0, shape), 3, SIM, "random")
    rate = args.load * capacity
    workload = chat_workload(args.seed, rate, shape)
    print(f"chat workload: {len(workload.requests)} requests of {args.conversations} conversations at "
          f"{rate:.1f} req/s ({args.load:.0%} of an estimated {capacity:.1f} req/s)", flush=True)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="gpud-routing-") as tmp, contextlib.ExitStack() as stack, \
            processes() as procs:
        work = Path(tmp)
        (work / "one").mkdir()
        one = stack.enter_context(running_daemon(work / "one", "sim:2x80GiB", "[proxy]\nworkers = 1\n"))
        models: dict[str, str | None] = {"lc": None, "session": "session", "prefix": "prefix", "rr": None}
        if router:
            models["ca"] = None
        ports = start_models(one, models, SIM)
        url = f"http://127.0.0.1:{one.port}"
        _, rr = start_nginx(procs, ports["rr"], work)
        targets: list[tuple[str, str, str, str]] = [
            ("gpud least-conn", url, "lc", "lc"), ("gpud session", url, "session", "session"),
            ("gpud prefix", url, "prefix", "prefix"), ("nginx round-robin", f"http://127.0.0.1:{rr}", "rr", "rr")]
        if router:
            targets.append(("vllm-router cache_aware", f"http://127.0.0.1:{start_cache_aware(procs, router, ports['ca'])}",
                            "ca", "ca"))
        for name, target, model, replicas in targets:
            print(f"  {name} …", flush=True)
            rows[name] = run_chat(workload, target, model, ports[replicas], session_header=True)
            print(f"    {rows[name]}", flush=True)
        print("90/10 mix, no shared prefixes …", flush=True)
        mix = mix_workload(3, args.mix_rate, args.mix_duration)
        mix_rows = {}
        for name, model in (("gpud least-conn", "mixlc"), ("gpud prefix", "mixpfx")):
            start_models(one, {model: None if model == "mixlc" else "prefix"},
                         replace(SIM, prefill_ms_per_1k_tokens=0, prefix_cache_tokens=0))
            results = asyncio.run(replay(mix, url, model, session_header=False, ordered=False))
            mix_rows[name] = summarize(results, ["short"])
            print(f"  {name}: short p99 {mix_rows[name]['latency_p99_ms']:.0f} ms", flush=True)
        print("prefix routing over 2 proxy workers …", flush=True)
        (work / "two").mkdir()
        two = stack.enter_context(running_daemon(work / "two", "sim:2x80GiB", "[proxy]\nworkers = 2\n"))
        two_ports = start_models(two, {"prefix": "prefix"}, SIM)
        rows["gpud prefix, 2 workers"] = run_chat(workload, f"http://127.0.0.1:{two.port}", "prefix",
                                                  two_ports["prefix"], session_header=True)
        print(f"    {rows['gpud prefix, 2 workers']}", flush=True)
        print(f"memory: {args.flat_requests} unique prompts through prefix routing …", flush=True)
        start_models(one, {"flat": "prefix"}, SimParams(ttft_ms=0, itl_ms=0, prefill_ms_per_1k_tokens=0,
                                                          prefix_cache_tokens=0, max_num_seqs=256))
        flat = asyncio.run(flat_load(one.port, "flat", args.flat_requests, 2048, 5, lambda: worker_rss(one)))
    table = report(rows, mix_rows, flat, rate, capacity, args)
    print("\n" + "\n".join(table))
    if args.write:
        write_section(Path(args.write), table, args)
    return 0


def report(rows: dict[str, dict[str, float]], mix: dict[str, dict[str, float]], flat: list[tuple[int, int]],
           rate: float, capacity: float, args: argparse.Namespace) -> list[str]:
    lines = [f"Chat workload: {args.conversations} conversations at {rate:.1f} req/s ({args.load:.0%} of the "
             f"estimated {capacity:.1f} req/s).", "",
             "| through | TTFT mean | p50 | p99 | throughput | cache hit rate | failed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['ttft_mean_ms']:,.0f} ms | {r['ttft_p50_ms']:,.0f} ms | {r['ttft_p99_ms']:,.0f} ms | "
                     f"{r['throughput_rps']:.2f} req/s | {r['hit_rate']:.2f} | {r['failed']:.0f} |")
    prefix, lc = rows["gpud prefix"], rows["gpud least-conn"]
    checks = [("prefix mean TTFT vs gpud least-conn", prefix["ttft_mean_ms"] / lc["ttft_mean_ms"], "≤ 0.50", 0.5, False),
              ("prefix throughput vs gpud least-conn", prefix["throughput_rps"] / lc["throughput_rps"], "≥ 0.90", 0.9, True)]
    if "vllm-router cache_aware" in rows:
        checks.append(("prefix mean TTFT vs vllm-router cache_aware",
                       prefix["ttft_mean_ms"] / rows["vllm-router cache_aware"]["ttft_mean_ms"], "≤ 1.00", 1.0, False))
    checks.append(("mix: prefix short p99 vs least-conn",
                   mix["gpud prefix"]["latency_p99_ms"] / mix["gpud least-conn"]["latency_p99_ms"], "≤ 1.10", 1.1, False))
    two = rows.get("gpud prefix, 2 workers")
    if two is not None:
        checks.append(("hit rate with 2 workers (own tables) vs 1", two["hit_rate"] / prefix["hit_rate"], "", None, True))
    lines += ["", "| check | ratio | target |", "| --- | ---: | ---: |"]
    for label, ratio, target, bound, higher in checks:
        ok = "" if bound is None else (" ✓" if (ratio >= bound if higher else ratio <= bound) else " ✗")
        lines.append(f"| {label} | {ratio:.2f} | {target}{ok} |")
    mib = 2**20
    lines += ["", "Proxy worker RSS while unique long prompts go through prefix routing "
              f"(table bound {100_000:,} blocks): " + ", ".join(f"{n:,} → {r / mib:.0f} MiB" for n, r in flat) + "."]
    return lines


def write_section(path: Path, table: list[str], args: argparse.Namespace) -> None:
    benchdoc.write_section(path, "Routing", [
        f"{benchdoc.measured()} The client, the daemon, its proxy worker, nginx, vllm-router and the sim "
        "replicas share these cores. Replicas: `--prefill-ms-per-1k-tokens 200 --prefix-cache-tokens 200000 "
        "--max-num-seqs 4`, 3 per target, cold at the start.", "",
        f"    python bench/routing_bench.py --conversations {args.conversations} --load {args.load:g} "
        f"--mix-rate {args.mix_rate:g} --mix-duration {args.mix_duration:g} --flat-requests {args.flat_requests}", "",
        *table])


if __name__ == "__main__":
    sys.exit(main())
