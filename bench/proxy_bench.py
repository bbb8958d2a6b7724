"""Proxy benchmark: a real `gpud daemon` side by side with nginx, vllm-router and direct connections, in one run.

    .venv/bin/python bench/proxy_bench.py [--duration 5] [--rounds 3] [--connections 32] [--streams 64]
                                          [--workers 1,2] [--stream-workers 1] [--vllm-router PATH]
                                          [--write docs/benchmarks.md]

What it measures (no GPU needed):

1. Small requests: `wrk -t1 -cN` POSTs a completion, the model named in the JSON body (as OpenAI clients do),
   over three **static nginx backends** (bench/static_backend.py: nginx answering at once, one worker each),
   which gpud starts as `command`-engine replicas — the backends are never the limit. Through:
   - gpud (the daemon with `proxy.workers` = each of --workers; the model routed by the body),
   - nginx `least_conn`, one worker, keep-alive to the same backends,
   - vllm-router (Rust, `pip install vllm-router`) `--policy power_of_two`, when it is installed,
   - direct: one wrk per backend at the same time, summed (the backends' own ceiling, far above the rest).
2. Streams over sim replicas (ttft 20 ms, 5 ms/token): `--streams` concurrent SSE completions through gpud and
   direct to the same replicas: events/s, gpud's CPU per forwarded event (daemon plus proxy workers, from
   /proc, over the whole client run; the same figure for one nginx worker over the same replicas beside it),
   and the first event's delay when all streams open at once (median),
   through gpud minus direct.
3. Balancing: an open-loop load (Poisson, the same seeded sequence for every target) of 90 % short (4 tokens)
   and 10 % long (200 tokens) completions on 3 sim replicas that run at most 4 requests at once; the p99 of
   the short requests through gpud, nginx round-robin and nginx least_conn.

Each measurement runs --rounds times, interleaved; the median is reported. Targets (issue #10): small requests
≥ 1.0× vllm-router and ≥ 0.35× nginx least_conn; streams ≥ 0.95× direct events/s, ≤ 20 µs gpud CPU per event,
first event ≤ +5 ms over direct; short p99 ≤ 0.8× nginx round-robin and ≤ 1.2× nginx least_conn.

Needs `wrk` and `nginx` on PATH (Debian: `apt-get install -y wrk nginx`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import benchdoc  # noqa: E402
from benchdaemon import BenchDaemon, running_daemon  # noqa: E402
from wrkrun import run_wrk  # noqa: E402

MODEL = "m"
SMALL_BODY = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1})
STATIC = f"{sys.executable} {ROOT / 'bench' / 'static_backend.py'} {{port}}"


# -- processes ---------------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_answering(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode} before answering {url}.")
        with contextlib.suppress(OSError):
            req = urllib.request.Request(url, data=SMALL_BODY.encode(), headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.1)
    raise SystemExit(f"{what} did not answer {url} within {timeout:.0f} s.")


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every process started inside is stopped (TERM, then KILL) on the way out."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_model(daemon: BenchDaemon, body: dict[str, object]) -> list[int]:
    """Start a model on a bench daemon and wait until every replica is ready; the replicas' ports."""
    daemon.client.request("POST", "/v1/models", body)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        shown = daemon.client.request("GET", f"/v1/models/{MODEL}")
        if not shown["busy"] and shown["replicas_ready"] == shown["replicas_desired"]:
            return [r["port"] for r in shown["replicas"]]
        time.sleep(0.1)
    raise SystemExit(f"the model did not become ready: {shown}")


def gpud_pids(daemon: BenchDaemon) -> list[int]:
    """The daemon and its proxy workers (not the replicas: they are the backends)."""
    import psutil

    root = psutil.Process(daemon.proc.pid)
    return [root.pid] + [p.pid for p in root.children() if "gpud.proxy.worker" in " ".join(p.cmdline())]


def nginx_tree(master: int) -> list[int]:
    """The nginx master and its worker."""
    import psutil

    return [master] + [p.pid for p in psutil.Process(master).children()]


def cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def start_nginx(procs: list[subprocess.Popen[bytes]], backends: list[int], workdir: Path) -> tuple[int, int]:
    """One-worker nginx in front of `backends`: (least_conn port, round-robin port), keep-alive upstreams."""
    lc, rr = free_port(), free_port()
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / sub).mkdir(exist_ok=True)
    location = """
        location / {{
            proxy_pass http://{};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}"""
    conf = workdir / f"nginx-{lc}.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx-{lc}.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    # Request bodies stay in memory, as gpud keeps them (nginx would write those over 16 KiB to a file).
    client_body_buffer_size 32m;
    client_max_body_size 32m;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    upstream least {{ least_conn;
{servers}
        keepalive 128; }}
    upstream rr {{
{servers}
        keepalive 128; }}
    server {{ listen 127.0.0.1:{lc};{location.format("least")}
    }}
    server {{ listen 127.0.0.1:{rr};{location.format("rr")}
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)], stdout=subprocess.DEVNULL)
    procs.append(proc)
    wait_answering(f"http://127.0.0.1:{lc}/v1/completions", proc, "nginx")
    return lc, rr


def start_vllm_router(procs: list[subprocess.Popen[bytes]], binary: str, backends: list[int]) -> int:
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--host", "127.0.0.1", "--port", str(port), "--policy", "power_of_two", "--log-level", "warning",
         "--worker-urls", *(f"http://127.0.0.1:{p}" for p in backends)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    procs.append(proc)
    wait_answering(f"http://127.0.0.1:{port}/v1/completions", proc, "vllm-router", timeout=60)
    return port


# -- small requests (wrk) ----------------------------------------------------------------------------------


def wrk_script(workdir: Path) -> Path:
    script = workdir / "post.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = \'{SMALL_BODY}\'\nwrk.headers["Content-Type"] = "application/json"\n')
    return script


# -- streams -----------------------------------------------------------------------------------------------


async def sse_client(ports: list[int], streams: int, duration: float, warmup: float) -> tuple[float, int]:
    """(events/s over the measured window, all events received), `streams` concurrent streaming completions."""
    import aiohttp

    count = 0
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 256, "stream": True}

    async def loop(session: aiohttp.ClientSession, url: str) -> None:
        nonlocal count
        while True:
            async with session.post(url, json=body) as r:
                if r.status != 200:
                    raise SystemExit(f"stream answered HTTP {r.status}: {await r.text()}")
                async for line in r.content:
                    if line.startswith(b"data: "):
                        count += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        tasks = [asyncio.ensure_future(loop(session, f"http://127.0.0.1:{ports[i % len(ports)]}/v1/completions"))
                 for i in range(streams)]
        try:
            await asyncio.sleep(warmup)
            start_count, start = count, time.perf_counter()
            await asyncio.sleep(duration)
            rate = (count - start_count) / (time.perf_counter() - start)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return rate, count


async def first_event_client(ports: list[int], streams: int) -> float:
    """Median seconds from opening to the first event, `streams` streams opened at once (connections ready)."""
    import aiohttp

    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": True}
    waits: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        for round_ in range(4):  # the first round opens the connections; the others measure
            begin = asyncio.Event()
            times: list[float] = []

            async def one(url: str, begin: asyncio.Event = begin, times: list[float] = times) -> None:
                await begin.wait()
                t0 = time.perf_counter()
                async with session.post(url, json=body) as r:
                    async for line in r.content:
                        if line.startswith(b"data: "):
                            times.append(time.perf_counter() - t0)
                            break
                    await r.read()

            tasks = [asyncio.ensure_future(one(f"http://127.0.0.1:{ports[i % len(ports)]}/v1/completions"))
                     for i in range(streams)]
            await asyncio.sleep(0.05)
            begin.set()
            await asyncio.gather(*tasks)
            if round_ > 0:
                waits.append(statistics.median(times))
    return statistics.median(waits)


# -- balancing ---------------------------------------------------------------------------------------------


async def balance_client(port: int, rate: float, duration: float, seed: int) -> float:
    """p99 latency (ms) of the short requests of a seeded open-loop 90 % short / 10 % long load."""
    import aiohttp

    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    arrivals: list[tuple[float, bool]] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        arrivals.append((t, rng.random() < 0.1))
    short: list[float] = []
    url = f"http://127.0.0.1:{port}/v1/completions"

    async def one(session: aiohttp.ClientSession, at: float, long: bool) -> None:
        await asyncio.sleep(at - loop.time())
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 200 if long else 4}
        async with session.post(url, json=body) as r:
            await r.read()
            if r.status != 200:
                raise SystemExit(f"balancing request answered HTTP {r.status}")
        if not long:  # from the scheduled arrival, so a lagging client cannot hide queueing
            short.append(loop.time() - at)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None)) as s:
        t0 = loop.time() + 0.2
        await asyncio.gather(*(one(s, t0 + at, long) for at, long in arrivals))
    return statistics.quantiles(short, n=100)[98] * 1000


def client(*args: str) -> list[float]:
    """Run a client mode of this script in its own process (uvloop): the figures of its last line."""
    out = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    return [float(x) for x in out.strip().splitlines()[-1].split()]


def run_fast(coro: object) -> object:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


# -- the run -----------------------------------------------------------------------------------------------


def rounds(n: int, runs: dict[str, Callable[[], float]]) -> dict[str, float]:
    results: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(n):
        for name, fn in runs.items():
            value = fn()
            results[name].append(value)
            print(f"  round {r + 1}: {name:<34} {value:12.1f}", flush=True)
    return {name: statistics.median(values) for name, values in results.items()}


def measure(args: argparse.Namespace) -> tuple[list[tuple[str, str, float, str, float, float | None, bool]], dict[str, float]]:
    workers = [int(w) for w in args.workers.split(",")]
    router = args.vllm_router or shutil.which("vllm-router")
    extra: dict[str, float] = {}
    rows: list[tuple[str, str, float, str, float, float | None, bool]] = []
    with tempfile.TemporaryDirectory(prefix="gpud-bench-") as tmp, contextlib.ExitStack() as stack, \
            processes() as procs:
        workdir = Path(tmp)
        script = wrk_script(workdir)
        static = {"model": MODEL, "engine": "command", "command": STATIC, "replicas": 3, "vram": "1GiB"}
        daemons: dict[int, tuple[BenchDaemon, list[int]]] = {}
        for n in workers:
            (workdir / f"w{n}").mkdir()
            daemon = stack.enter_context(running_daemon(workdir / f"w{n}", "sim:2x80GiB",
                                                        f"[proxy]\nworkers = {n}\n"))
            daemons[n] = (daemon, start_model(daemon, static))
        backends = daemons[workers[0]][1]
        nginx_lc, _ = start_nginx(procs, backends, workdir)
        runs: dict[str, Callable[[], float]] = {}
        p50: dict[str, list[float]] = {}

        def wrk_run(name: str, ports: list[int]) -> Callable[[], float]:
            def go() -> float:
                measured = run_wrk(ports, args.connections, args.duration, script)
                rate, median = measured.requests_per_sec, measured.p50_ms
                p50.setdefault(name, []).append(median)
                return rate
            return go

        for n, (daemon, _) in daemons.items():
            runs[f"gpud, {n} worker{'s' if n > 1 else ''}"] = wrk_run(f"gpud{n}", [daemon.port])
        runs["nginx least_conn, 1 worker"] = wrk_run("nginx", [nginx_lc])
        if router:
            runs["vllm-router power_of_two"] = wrk_run("router", [start_vllm_router(procs, router, backends)])
        runs["direct (3 wrk, summed)"] = wrk_run("direct", backends)
        for port in [d.port for d, _ in daemons.values()] + [nginx_lc] + backends:
            run_wrk([port], args.connections, 1, script)
        print(f"Small requests over 3 static nginx backends, wrk -t1 -c{args.connections}, req/s:", flush=True)
        small = rounds(args.rounds, runs)
        for name, values in p50.items():
            extra[f"p50 {name}"] = statistics.median(values)
        first = f"gpud, {workers[0]} worker{'s' if workers[0] > 1 else ''}"
        best = max((k for k in small if k.startswith("gpud")), key=lambda k: small[k])
        rows.append(("small requests, req/s", best, small[best], "nginx least_conn, 1 worker",
                     small["nginx least_conn, 1 worker"], 0.35, True))
        if router:
            rows.append(("small requests, req/s", best, small[best], "vllm-router power_of_two",
                         small["vllm-router power_of_two"], 1.0, True))
        rows.append(("small requests, req/s", "nginx least_conn, 1 worker", small["nginx least_conn, 1 worker"],
                     "direct (3 wrk, summed)", small["direct (3 wrk, summed)"], None, True))
        for name in small:
            if name.startswith("gpud") and name != first:
                rows.append(("workers curve, req/s", name, small[name], first, small[first], None, True))
        for daemon, _ in daemons.values():
            daemon.client.request("DELETE", f"/v1/models/{MODEL}")

        (workdir / "sse").mkdir()
        sse_daemon = stack.enter_context(running_daemon(workdir / "sse", "sim:2x80GiB",
                                                        f"[proxy]\nworkers = {args.stream_workers}\n"))
        sims = start_model(sse_daemon, {"model": MODEL, "engine": "sim", "replicas": 3, "vram": "1GiB",
                                        "args": ["--startup-s", "0"]})
        pids = gpud_pids(sse_daemon)
        cpu_per_event: list[float] = []

        def through_gpud() -> float:
            before = cpu_seconds(pids)
            rate, total = client("--sse-client", str(args.streams), str(args.duration), str(sse_daemon.port))
            cpu_per_event.append((cpu_seconds(pids) - before) / total * 1e6)
            return rate

        print(f"Streams: {args.streams} concurrent SSE completions (ttft 20 ms, 5 ms/token), gpud with "
              f"proxy.workers = {args.stream_workers}, events/s:", flush=True)
        # The same streams through one nginx worker: what forwarding an event costs a C proxy on this machine
        # (the kernel's share, loopback TCP both ways, is most of it and the same for every proxy).
        sse_nginx, _ = start_nginx(procs, sims, workdir)
        nginx_pids = nginx_tree(procs[-1].pid)
        nginx_cpu: list[float] = []

        def through_nginx() -> float:
            before = cpu_seconds(nginx_pids)
            rate, total = client("--sse-client", str(args.streams), str(args.duration), str(sse_nginx))
            nginx_cpu.append((cpu_seconds(nginx_pids) - before) / total * 1e6)
            return rate

        sse = rounds(args.rounds, {
            "gpud": through_gpud,
            "nginx least_conn, 1 worker": through_nginx,
            "direct": lambda: client("--sse-client", str(args.streams), str(args.duration), *map(str, sims))[0],
        })
        rows.append((f"SSE x{args.streams}, events/s", "gpud", sse["gpud"], "direct", sse["direct"], 0.95, True))
        rows.append((f"SSE x{args.streams}, events/s", "nginx least_conn, 1 worker", sse["nginx least_conn, 1 worker"],
                     "direct", sse["direct"], None, True))
        extra["gpud CPU µs per event"] = statistics.median(cpu_per_event)
        extra["nginx CPU µs per event"] = statistics.median(nginx_cpu)
        print(f"First event, {args.streams} streams opened at once, median ms:", flush=True)
        first_event = rounds(args.rounds, {
            "gpud": lambda: client("--first-event", str(args.streams), str(sse_daemon.port))[0] * 1000,
            "direct": lambda: client("--first-event", str(args.streams), *map(str, sims))[0] * 1000,
        })
        extra["first event overhead ms"] = first_event["gpud"] - first_event["direct"]
        extra["first event gpud ms"], extra["first event direct ms"] = first_event["gpud"], first_event["direct"]
        sse_daemon.client.request("DELETE", f"/v1/models/{MODEL}")

        (workdir / "bal").mkdir()
        bal = stack.enter_context(running_daemon(workdir / "bal", "sim:2x80GiB",
                                                 f"[proxy]\nworkers = {args.stream_workers}\n"))
        queued = start_model(bal, {"model": MODEL, "engine": "sim", "replicas": 3, "vram": "1GiB",
                                   "args": ["--startup-s", "0", "--max-num-seqs", "4"]})
        bal_lc, bal_rr = start_nginx(procs, queued, workdir)
        print(f"Balancing, open loop {args.rate:g} req/s, 90 % short / 10 % long, max 4 running per replica, "
              "short-request p99 ms:", flush=True)
        p99 = rounds(args.rounds, {
            name: (lambda port=port: client("--balance-client", str(port), str(args.rate), str(args.balance_duration))[0])
            for name, port in (("gpud", bal.port), ("nginx round-robin", bal_rr), ("nginx least_conn", bal_lc))
        })
        rows.append(("short p99 (90/10 mix), ms", "gpud", p99["gpud"], "nginx round-robin", p99["nginx round-robin"],
                     0.8, False))
        rows.append(("short p99 (90/10 mix), ms", "gpud", p99["gpud"], "nginx least_conn", p99["nginx least_conn"],
                     1.2, False))
    return rows, extra


def report(rows: list[tuple[str, str, float, str, float, float | None, bool]], extra: dict[str, float]) -> list[str]:
    table = ["| measure | subject | value | reference | value | ratio | target |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for measure_, subject, value, ref, ref_value, target, higher in rows:
        ratio = value / ref_value if ref_value else float("nan")
        verdict = ""
        if target is not None:
            ok = ratio >= target if higher else ratio <= target
            verdict = f"{'≥' if higher else '≤'} {target:.2f} {'✓' if ok else '✗'}"
        table.append(f"| {measure_} | {subject} | {value:,.0f} | {ref} | {ref_value:,.0f} | {ratio:.3f} | {verdict} |")
    cpu = extra.get("gpud CPU µs per event", float("nan"))
    overhead = extra.get("first event overhead ms", float("nan"))
    table += [
        "",
        "| figure | value | target |",
        "| --- | ---: | ---: |",
        f"| gpud CPU per forwarded event (daemon + workers) | {cpu:.1f} µs | ≤ 20 µs {'✓' if cpu <= 20 else '✗'} |",
        f"| nginx CPU per forwarded event (master + 1 worker, the same streams) | "
        f"{extra.get('nginx CPU µs per event', float('nan')):.1f} µs | |",
        f"| first event, gpud − direct (median of {extra.get('streams', 0):.0f} opened at once) | "
        f"{overhead:+.1f} ms ({extra['first event gpud ms']:.1f} vs {extra['first event direct ms']:.1f}) | "
        f"≤ +5 ms {'✓' if overhead <= 5 else '✗'} |",
    ]
    table += [f"| wrk p50 latency, {k[4:]} | {v:.2f} ms | |" for k, v in extra.items() if k.startswith("p50 ")]
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--workers", default="1,2", help="proxy.workers values to measure, e.g. 1,2,4")
    parser.add_argument("--stream-workers", type=int, default=1,
                        help="proxy.workers for the streaming and balancing runs (default 1: auto on 2 cores)")
    parser.add_argument("--vllm-router", metavar="PATH", help="the vllm-router binary (default: on PATH)")
    parser.add_argument("--rate", type=float, default=50.0, help="balancing load, requests/s")
    parser.add_argument("--balance-duration", type=float, default=30.0, help="seconds per balancing run")
    parser.add_argument("--write", metavar="FILE", help="replace the 'Proxy' section of this Markdown file")
    parser.add_argument("--sse-client", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--first-event", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--balance-client", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sse_client:
        streams, duration, *ports = args.sse_client
        rate, total = run_fast(sse_client([int(p) for p in ports], int(streams), float(duration), 1.0))  # type: ignore[misc]
        print(rate, total)
        return 0
    if args.first_event:
        streams, *ports = args.first_event
        print(run_fast(first_event_client([int(p) for p in ports], int(streams))))
        return 0
    if args.balance_client:
        port, rate, duration = args.balance_client
        print(run_fast(balance_client(int(port), float(rate), float(duration), seed=3)))
        return 0
    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if missing:
        print(f"Missing {' and '.join(missing)}: install with `apt-get install -y wrk nginx`.", file=sys.stderr)
        return 1
    rows, extra = measure(args)
    extra["streams"] = args.streams
    table = report(rows, extra)
    print("\n" + "\n".join(table))
    if args.write:
        write_section(Path(args.write), table, args)
    return 0


def write_section(path: Path, table: list[str], args: argparse.Namespace) -> None:
    command = (f"python bench/proxy_bench.py --duration {args.duration:g} --rounds {args.rounds} --connections "
               f"{args.connections} --streams {args.streams} --workers {args.workers} --stream-workers "
               f"{args.stream_workers} --rate {args.rate:g} --balance-duration {args.balance_duration:g}")
    benchdoc.write_section(path, "Proxy", [
        f"{benchdoc.measured()} Everything shares these cores: wrk, the daemon and its proxy workers, the backends, "
        "nginx, vllm-router and the stream clients. Median of the rounds.",
        "",
        f"    {command}",
        "",
        *table,
    ])


if __name__ == "__main__":
    sys.exit(main())
