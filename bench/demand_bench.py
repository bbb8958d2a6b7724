"""Demand benchmark (issue 12): many models on few GPUs — pinned, gpud (idle timeouts + eviction), LRU swapper.

    .venv/bin/python bench/demand_bench.py [--day-sec 120] [--rate 1] [--startup-s 1] [--idle-sec 10]
                                           [--overhead-runs 10] [--seed 1] [--only comparison|overhead]
                                           [--write docs/benchmarks.md]

Six models on two simulated 80 GiB GPUs that hold three at once (each model: one replica of 25 GiB on
both GPUs, the sim engine with `--startup-s` of loading). A day of traffic is compressed into `--day-sec`
seconds: requests arrive at `--rate` per second on average, fewer at night and more by day (a sine), each
for a model drawn from a Zipf popularity (s = 1.5: the top three get ~84 %), plus bursts that carry ~15 % of the requests (10
requests within 2 s for one model drawn uniformly, as a batch job would send). The same trace, from
`--seed`, is replayed against three systems, each request a streaming completion of 16 tokens:

- pinned: `gpud model start` of every model, no idle timeout: the fourth does not fit (its refusal is
  shown), requests for the models that could not start get 404;
- gpud: every model `--on-demand --idle-timeout IDLE`: requests wake models, idle ones are evicted for
  others, least recently used first;
- LRU swapper (bench/lru_swapper.py): one model at a time, the running one unloaded whenever another is
  asked for, as llama-swap does.

Figures: requests served, latency (to the last byte) p50/p99, time to first token p50/p99, loads (wakes),
evictions (unloads to make room), and the time to first token of requests that waited for a load (those
whose first token took longer than the engine's simulated load, `--startup-s`).

Then the wake overhead itself, `--overhead-runs` times: the first-token time of a request that wakes an
idle on-demand model (nothing to evict) minus the engine's own start time — from its process's creation
(read from /proc) to its /health answering 200 (polled by the benchmark every 2 ms) — and minus the engine's
own time to first token. Measured inside one wake, so a busy machine slows both sides alike. Target:
< 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import benchdoc  # noqa: E402
from benchdaemon import BenchDaemon, running_daemon  # noqa: E402 - after the path setup above

from gpud.cli.client import Client, model_path  # noqa: E402
from gpud.errors import GpudError  # noqa: E402

MODELS = [f"m{i}" for i in range(6)]
GPUS = "sim:2x80GiB"
MODEL_FIELDS = {"engine": "sim", "gpus_per_replica": 2, "vram": "25GiB"}  # 3 x 25 GiB fit in 79.5 GiB
TOKENS = 16
ZIPF_S = 1.5  # the three most popular models get ~84 % of the requests, the other three the long tail


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest-rank method; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# ---- the trace ---------------------------------------------------------------------------------------


def trace(day_sec: float, rate: float, seed: int) -> list[tuple[float, str]]:
    """(seconds from the start, model) for every request of the compressed day, in time order."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** ZIPF_S for rank in range(len(MODELS))]
    peak = 1.75 * rate  # rate(t) = rate * (0.25 + 1.5 sin²(πt/day)) averages `rate`
    arrivals: list[tuple[float, str]] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= day_sec:
            break
        if rng.random() < (0.25 + 1.5 * math.sin(math.pi * t / day_sec) ** 2) / 1.75:  # thinning
            arrivals.append((t, rng.choices(MODELS, weights)[0]))
    for _ in range(max(2, round(0.15 * len(arrivals) / 10))):  # ~15 % of the requests: batch jobs, any model
        at, model = rng.uniform(0, day_sec * 0.95), rng.choice(MODELS)
        arrivals += [(at + rng.uniform(0, 2), model) for _ in range(10)]
    return sorted(arrivals)


# ---- replaying it ------------------------------------------------------------------------------------


@dataclass
class Result:
    model: str
    status: int
    ttft: float | None  # seconds to the first token (None: no token came)
    latency: float
    error: str = ""  # the error body's message, for a request that was not served


async def one(session: aiohttp.ClientSession, url: str, model: str) -> Result:
    body = {"model": model, "prompt": "hi", "max_tokens": TOKENS, "stream": True}
    started = time.perf_counter()
    ttft = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                text = await resp.text()
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    text = json.loads(text)["error"]["message"]
                return Result(model, resp.status, None, time.perf_counter() - started, text)
            async for line in resp.content:
                if ttft is None and line.startswith(b"data: {"):
                    ttft = time.perf_counter() - started
            return Result(model, resp.status, ttft, time.perf_counter() - started)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return Result(model, 0, ttft, time.perf_counter() - started)


async def replay(url: str, requests: list[tuple[float, str]]) -> list[Result]:
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()

        async def at(offset: float, model: str) -> Result:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            return await one(session, url, model)

        return list(await asyncio.gather(*(at(t, m) for t, m in requests)))


@dataclass
class Outcome:
    name: str
    results: list[Result]
    loads: int | str
    evictions: int | str
    note: str = ""


class EventCounter:
    """Counts `wake` and `evicted` events of a daemon's /v1/events stream in a thread."""

    def __init__(self, sock: str) -> None:
        self.counts = {"wake": 0, "evicted": 0}
        ready = threading.Event()

        def read() -> None:
            lines = Client(sock).stream_lines("/v1/events", timeout=24 * 3600)
            with contextlib.suppress(GpudError):
                for line in lines:
                    ready.set()
                    kind = json.loads(line).get("type")
                    if kind in self.counts:
                        self.counts[kind] += 1
                    elif kind == "shutdown":
                        return

        threading.Thread(target=read, daemon=True).start()
        ready.wait(10)


def start_models(d: BenchDaemon, args: argparse.Namespace, **fields: Any) -> list[str]:
    """Start the six models; returns the refusals (one sentence each)."""
    refusals = []
    for name in MODELS:
        body = {"name": name, "model": name, **MODEL_FIELDS, "args": ["--startup-s", str(args.startup_s)], **fields}
        try:
            d.client.request("POST", "/v1/models", body)
        except GpudError as exc:
            refusals.append(f"{name}: {exc.message}")
    deadline = time.monotonic() + 120
    while any(m["busy"] for m in d.client.request("GET", "/v1/models")["models"]):
        if time.monotonic() > deadline:
            raise SystemExit("the models did not settle within 120 s")
        time.sleep(0.1)
    return refusals


def run_pinned(workdir: Path, args: argparse.Namespace, requests: list[tuple[float, str]]) -> Outcome:
    with running_daemon(workdir, GPUS) as d:
        refusals = start_models(d, args)
        results = asyncio.run(replay(f"http://127.0.0.1:{d.port}/v1/completions", requests))
    return Outcome("every model pinned", results, 6 - len(refusals), 0,
                   note=refusals[0] if refusals else "all six fit (unexpected)")


def run_gpud(workdir: Path, args: argparse.Namespace, requests: list[tuple[float, str]]) -> Outcome:
    config = "[proxy]\nwake_timeout_sec = 300\n"
    with running_daemon(workdir, GPUS, config) as d:
        start_models(d, args, on_demand=True, idle_timeout=args.idle_sec)
        events = EventCounter(d.socket)
        results = asyncio.run(replay(f"http://127.0.0.1:{d.port}/v1/completions", requests))
        time.sleep(0.5)  # the last events reach the counter
    return Outcome("gpud: on-demand, idle timeout, eviction", results, events.counts["wake"],
                   events.counts["evicted"])


def run_swapper(workdir: Path, args: argparse.Namespace, requests: list[tuple[float, str]]) -> Outcome:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "lru_swapper.py"), "--port", str(port),
                             "--startup-s", str(args.startup_s)], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "swapper listening on …"
        results = asyncio.run(replay(f"http://127.0.0.1:{port}/v1/completions", requests))
        stats = asyncio.run(get_json(f"http://127.0.0.1:{port}/stats"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return Outcome("LRU swapper, one model at a time", results, stats["loads"], stats["unloads"])


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return await resp.json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- wake overhead -----------------------------------------------------------------------------------


def process_start(pid: int) -> tuple[float, int]:
    """When process `pid` was created, on the CLOCK_BOOTTIME scale (clock ticks, 10 ms on Linux), and its parent."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK"), int(fields[1])


async def one_wake(d: BenchDaemon, url: str) -> dict[str, float]:
    """Wake the idle model "w" with one request and time its parts from outside the daemon.

    boot-clock times: sent → the engine process is created (/proc) → its /health answers 200 (polled here
    every 2 ms) → the first token reaches the client. The engine's own part is creation → 200, plus its own
    time to first token (a second request sent straight to its port); the rest is gpud's."""
    clock = time.CLOCK_BOOTTIME
    async with aiohttp.ClientSession() as session:
        sent = time.clock_gettime(clock)
        request = asyncio.ensure_future(one(session, url, "w"))
        pid = port = None
        while pid is None or port is None:  # the engine's pid and port, as soon as the daemon knows them
            replicas = (await asyncio.to_thread(d.client.request, "GET", model_path("w")))["replicas"]
            if replicas and replicas[0]["pid"]:
                pid, port = replicas[0]["pid"], replicas[0]["port"]
        created, shim_pid = process_start(pid)
        shim_created = process_start(shim_pid)[0]  # the parent shim (gpud.supervise.shim)
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                    if resp.status == 200:
                        break
            await asyncio.sleep(0.002)
        ready = time.clock_gettime(clock)
        result = await request
        assert result.status == 200 and result.ttft is not None, result
        engine_ttft = (await one(session, f"http://127.0.0.1:{port}/v1/completions", "w")).ttft
        assert engine_ttft is not None
    # A standby shim (gpud.supervise.standby) was started before the request: 0, and counted as such.
    return {"ttft": result.ttft, "before": created - sent, "to_shim": max(0.0, shim_created - sent),
            "standby": 1.0 if shim_created < sent else 0.0,
            "engine": ready - created + engine_ttft, "after": sent + result.ttft - ready - engine_ttft}


def wake_overhead(workdir: Path, runs: int, startup_s: float) -> dict[str, float]:
    samples: list[dict[str, float]] = []
    with running_daemon(workdir, GPUS, "[proxy]\nwake_timeout_sec = 60\n") as d:
        d.client.request("POST", "/v1/models", {"name": "w", "model": "w", "engine": "sim", "vram": "10GiB",
                                               "on_demand": True, "args": ["--startup-s", str(startup_s)]})
        url = f"http://127.0.0.1:{d.port}/v1/completions"
        for _ in range(runs):
            samples.append(asyncio.run(one_wake(d, url)))
            d.client.request("POST", model_path("w", "unload"), {})
            while d.client.request("GET", model_path("w"))["state"] != "idle":
                time.sleep(0.05)
    out = {key: percentile([s[key] for s in samples], 0.5) for key in ("ttft", "before", "engine", "after")}
    cold = [s["to_shim"] for s in samples if not s["standby"]]  # the shim started for this wake
    out["to_shim"] = percentile(cold, 0.5) if cold else 0.0
    out["overhead"] = percentile([s["ttft"] - s["engine"] for s in samples], 0.5)
    out["overhead_max"] = max(s["ttft"] - s["engine"] for s in samples)
    out["standby"] = sum(s["standby"] for s in samples)
    return out


# ---- report ------------------------------------------------------------------------------------------


def table(outcomes: list[Outcome], startup_s: float) -> list[str]:
    def ms(values: list[float], q: float) -> str:
        return "-" if not values else f"{percentile(values, q) * 1000:,.0f}"

    rows: dict[str, list[str]] = {k: [] for k in (
        "requests served", "refused or failed", "latency p50 / p99, ms", "time to first token p50 / p99, ms",
        "loads (wakes)", "evictions (unloads for another model)", "requests that waited for a load",
        "their time to first token p50 / p99, ms")}
    for o in outcomes:
        ok = [r for r in o.results if r.status == 200 and r.ttft is not None]
        statuses: dict[int, int] = {}
        for r in o.results:
            if not (r.status == 200 and r.ttft is not None):
                statuses[r.status] = statuses.get(r.status, 0) + 1
        cold = [r.ttft for r in ok if r.ttft is not None and r.ttft > startup_s]
        rows["requests served"].append(f"{len(ok):,} / {len(o.results):,} ({100 * len(ok) / len(o.results):.0f} %)")
        rows["refused or failed"].append(", ".join(f"{n} × HTTP {s or 'error'}" for s, n in sorted(statuses.items()))
                                         or "0")
        rows["latency p50 / p99, ms"].append(f"{ms([r.latency for r in ok], 0.5)} / {ms([r.latency for r in ok], 0.99)}")
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        rows["time to first token p50 / p99, ms"].append(f"{ms(ttfts, 0.5)} / {ms(ttfts, 0.99)}")
        rows["loads (wakes)"].append(str(o.loads))
        rows["evictions (unloads for another model)"].append(str(o.evictions))
        rows["requests that waited for a load"].append(f"{len(cold):,}")
        rows["their time to first token p50 / p99, ms"].append(f"{ms(cold, 0.5)} / {ms(cold, 0.99)}")
    head = "| | " + " | ".join(o.name for o in outcomes) + " |"
    return [head, "| --- |" + " ---: |" * len(outcomes), *(f"| {k} | {' | '.join(v)} |" for k, v in rows.items())]


def write_section(path: Path, lines: list[str]) -> None:
    benchdoc.write_section(path, "Demand", [benchdoc.measured(), "", *lines])


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gpud-demand-", dir="/tmp"))
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


NOTES = (
    "Reading it: pinned serves only the three models that fit and refuses the rest for the whole day; the "
    "swapper serves everything but one model at a time, so every change of model waits for the running one "
    "to drain, stop and the next to load, and requests queue behind the swaps; gpud keeps three loaded, "
    "loads the others when asked and evicts the least recently used, so only requests for a model that is "
    "not loaded wait for a load. A compressed day exaggerates the cost of loads: an engine's load is not "
    "compressed (here the sim's `--startup-s` plus the engine's Python interpreter starting), while the gaps "
    "between requests are. The wake overhead is what gpud adds to the engine's "
    "own start. Without the standby parent shim (gpud.supervise.standby) nearly all of it was the shim's "
    "interpreter start, a Python process that must exist before the engine does: 340 ms on this machine "
    "before it landed, against tens of ms with it.\n\n"
    "A full run, closer to a real day (an hour a minute, a load of ~2 simulated minutes, an idle timeout of an "
    "hour): `python bench/demand_bench.py --day-sec 1440 --rate 1 --startup-s 2 --idle-sec 60 "
    "--overhead-runs 30` on a quiet machine with 4 or more cores; it takes about 1 h 30 min (24 min per "
    "system plus the swapper's backlog, each request bounded at 300 s) and needs ~2 GiB of memory (the daemon, "
    "up to three sim engines and the client)."
)


def comparison(args: argparse.Namespace) -> list[str]:
    """The three systems on one trace: the table and what it ran."""
    requests = trace(args.day_sec, args.rate, args.seed)
    counts = {m: sum(1 for _, x in requests if x == m) for m in MODELS}
    print(f"{len(requests)} requests over {args.day_sec:g} s: {counts}", flush=True)
    outcomes = []
    for run in (run_pinned, run_gpud, run_swapper):
        with workdir() as path:
            started = time.monotonic()
            outcomes.append(run(path, args, requests))
            print(f"{outcomes[-1].name}: {time.monotonic() - started:.0f} s", flush=True)
    hour = args.day_sec / 24
    return [
        f"Six sim models of 25 GiB on each of 2 simulated 80 GiB GPUs (three fit at once), each taking "
        f"{args.startup_s:g} s to load; a day in {args.day_sec:g} s (an hour is {hour:.1f} s), {len(requests):,} "
        f"streaming requests of {TOKENS} tokens, Zipf popularity {counts}, with bursts; gpud's idle timeout "
        f"{args.idle_sec:g} s ({args.idle_sec / hour * 60:.0f} simulated minutes).",
        "",
        *table(outcomes, args.startup_s),
        "",
        f"Pinned, the fourth model is refused: \"{outcomes[0].note}\"",
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--day-sec", type=float, default=120.0, help="the compressed day, seconds (default 120)")
    parser.add_argument("--rate", type=float, default=1.0, help="mean requests per second (default 1)")
    parser.add_argument("--startup-s", type=float, default=1.0, help="the sim engine's load time (default 1)")
    parser.add_argument("--idle-sec", type=float, default=10.0, help="gpud's idle timeout (default 10)")
    parser.add_argument("--overhead-runs", type=int, default=10)
    parser.add_argument("--overhead-startup-s", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", choices=("comparison", "overhead"), help="run one part (default: both)")
    parser.add_argument("--write", type=Path, help="Markdown file whose '## Demand' section to replace")
    args = parser.parse_args()

    shown = [a for i, a in enumerate(sys.argv[1:]) if a != "--write" and (i == 0 or sys.argv[i] != "--write")]
    lines = [f"    python bench/demand_bench.py {' '.join(shown)}".rstrip(), ""]
    if args.only in (None, "comparison"):
        lines += comparison(args)
    if args.only in (None, "overhead"):
        with workdir() as path:
            overhead = wake_overhead(path, args.overhead_runs, args.overhead_startup_s)
        lines += [
            f"Wake overhead ({args.overhead_runs} wakes of an idle on-demand model with nothing to evict, sim "
            f"engine with `--startup-s {args.overhead_startup_s:g}`, medians): the first token came "
            f"{overhead['ttft'] * 1000:.0f} ms after the request; the engine's own part (its process created → "
            f"/health 200, plus its own time to first token) was {overhead['engine'] * 1000:.0f} ms. gpud's "
            f"overhead: {overhead['overhead'] * 1000:.0f} ms (worst {overhead['overhead_max'] * 1000:.0f} ms; target "
            f"< 100 ms), of which {overhead['before'] * 1000:.0f} ms before the engine process exists "
            f"(the proxy, placement, the supervisor, and the parent shim: in {overhead['standby']:.0f} of "
            f"{args.overhead_runs} wakes a standby started ahead of need"
            + (f", in the others {overhead['to_shim'] * 1000:.0f} ms to its spawn then its own interpreter start"
               if overhead["standby"] < args.overhead_runs else "")
            + f") and {overhead['after'] * 1000:.0f} ms from the engine being ready to "
            f"the first token reaching the client (the readiness check, the held request going out). Times of "
            f"process creation come from /proc (10 ms resolution).",
        ]
    lines += ["", NOTES]
    print("\n".join(lines))
    if args.write:
        write_section(args.write, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
