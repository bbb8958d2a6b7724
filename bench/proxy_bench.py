"""Proxy benchmark: gpud's proxy side by side with nginx and with direct connections, in one run.

    .venv/bin/python bench/proxy_bench.py [--duration 5] [--rounds 3] [--connections 64] [--streams 64]
                                          [--nginx-workers auto] [--write docs/benchmarks.md]

What it measures, on sim replicas (`python -m gpud.sim.server`, no GPU needed):

1. Small-request throughput: `wrk` POSTs a one-token completion (model named in the JSON body, as OpenAI
   clients do) to 3 replicas that answer at once (`--ttft-ms 0`), for each of
   - gpud's proxy (its own process, uvloop, metrics on: what `gpud daemon` runs),
   - nginx with `least_conn` and keep-alive to the same replicas,
   - direct: one wrk per replica at the same time, summed (the replicas' own ceiling).
2. SSE: `--streams` concurrent streaming completions (20 ms to the first token, 5 ms between tokens, as
   the sim's defaults) through the proxy and direct to the replicas; events (SSE `data:` lines) per second
   received by the client.
3. Balancing quality: an open-loop load (Poisson arrivals at `--rate` req/s, the same seeded sequence for
   every target) of 90 % short (4 tokens) and 10 % long (200 tokens) completions on 3 replicas that run at
   most 4 requests at once (`--max-num-seqs 4`, the rest queue, as on a busy vLLM), through gpud's proxy,
   nginx round-robin and nginx least_conn; the p99 latency of the short requests is compared.

Each measurement runs `--rounds` times, interleaved, and the median is reported, because on a small box
other load moves single numbers. Targets (issue #3): proxy ≥ 0.30 × nginx least_conn req/s; SSE through
the proxy ≥ 0.90 × direct events/s; short-request p99 ≤ 0.8 × nginx round-robin and ≤ 1.1 × nginx
least_conn.

Needs `wrk` and `nginx` on PATH (Debian/Ubuntu: `sudo apt-get install -y wrk nginx`; the nginx service
does not need to run, this script starts its own nginx on a free port with a private config).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "sim"
SMALL_BODY = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1})


# -- processes ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode} before listening on port {port}.")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on port {port} within {timeout:.0f} s.")


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


def start_sims(procs: list[subprocess.Popen[bytes]], n: int, *args: str) -> list[int]:
    ports = []
    for _ in range(n):
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpud.sim.server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--startup-s",
                "0",
                "--served-model-name",
                MODEL,
                *args,
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        procs.append(proc)
        ports.append(port)
    for port, proc in zip(ports, procs[-n:], strict=True):
        wait_listening(port, proc, "simserver")
    return ports


def start_proxy(procs: list[subprocess.Popen[bytes]], backends: list[int]) -> int:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-proxy", str(port), *map(str, backends)], cwd=ROOT
    )
    procs.append(proc)
    wait_listening(port, proc, "gpud proxy")
    return port


def start_nginx(
    procs: list[subprocess.Popen[bytes]], backends: list[int], workdir: Path, workers: str
) -> tuple[int, int]:
    """nginx in front of `backends`: (least_conn port, round-robin port). The upstream state lives in a
    shared zone, so least_conn counts connections across all worker processes."""
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
worker_processes {workers};
daemon off;
pid {workdir}/nginx-{lc}.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    upstream least {{
        zone least 64k;
        least_conn;
{servers}
        keepalive 128;
    }}
    upstream rr {{
        zone rr 64k;
{servers}
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{lc};{location.format("least")}
    }}
    server {{
        listen 127.0.0.1:{rr};{location.format("rr")}
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)], stdout=subprocess.DEVNULL)
    procs.append(proc)
    wait_listening(lc, proc, "nginx")
    wait_listening(rr, proc, "nginx")
    return lc, rr


# -- small requests (wrk) ----------------------------------------------------------------------------------


def wrk_script(workdir: Path) -> Path:
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{SMALL_BODY}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return script


def wrk(ports: list[int], connections: int, duration: float, script: Path) -> float:
    """Requests/s summed over one wrk per port, run at the same time; non-2xx answers abort the bench."""
    per = max(1, connections // len(ports))
    procs = [
        subprocess.Popen(
            [
                "wrk",
                "-t1",
                f"-c{per}",
                f"-d{duration:g}s",
                "-s",
                str(script),
                f"http://127.0.0.1:{p}/v1/completions",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for p in ports
    ]
    total = 0.0
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"wrk failed:\n{out}")
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if bad:
            raise SystemExit(f"wrk saw {bad.group(1)} error answers:\n{out}")
        total += float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return total


# -- SSE streams -------------------------------------------------------------------------------------------


async def sse_client(ports: list[int], streams: int, duration: float, warmup: float) -> float:
    """Events/s received by `streams` concurrent streaming completions, spread over `ports` round-robin."""
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

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        tasks = [
            asyncio.ensure_future(loop(session, f"http://127.0.0.1:{ports[i % len(ports)]}/v1/completions"))
            for i in range(streams)
        ]
        try:
            await asyncio.sleep(warmup)
            start_count, start = count, time.perf_counter()
            await asyncio.sleep(duration)
            rate = (count - start_count) / (time.perf_counter() - start)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return rate


def _client_process(*args: str) -> float:
    """Run one of this script's client modes in its own process (uvloop), so the bench's own loop does not
    share its core; the mode prints its figure on its last line."""
    out = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    return float(out.strip().splitlines()[-1])


def sse(ports: list[int], streams: int, duration: float) -> float:
    return _client_process("--sse-client", str(streams), str(duration), *map(str, ports))


# -- balancing quality -------------------------------------------------------------------------------------


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
        if not long:
            # From the scheduled arrival, so a lagging client cannot hide queueing (coordinated omission).
            short.append(loop.time() - at)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as s:
        t0 = loop.time() + 0.2
        await asyncio.gather(*(one(s, t0 + at, long) for at, long in arrivals))
    return statistics.quantiles(short, n=100)[98] * 1000


def balance(port: int, rate: float, duration: float) -> float:
    return _client_process("--balance-client", str(port), str(rate), str(duration))


# -- internal modes ----------------------------------------------------------------------------------------


def serve_proxy(port: int, backends: list[int]) -> None:
    """The proxy as `gpud daemon` runs it: registry of READY replicas, metrics on, uvloop."""
    from gpud.proxy.metrics import Metrics
    from gpud.proxy.server import Proxy
    from gpud.registry import Model, Registry, Replica, ReplicaState
    from gpud.spec import ModelSpec

    registry = Registry()
    model = Model(spec=ModelSpec(name=MODEL, model=MODEL, engine="sim", replicas=len(backends)))
    for i, backend in enumerate(backends):
        model.replicas[i] = Replica(
            model=MODEL, index=i, gpus=(), vram_by_gpu=(), port=backend, state=ReplicaState.READY
        )
    registry.models[MODEL] = model

    async def main() -> None:
        proxy = Proxy(registry, metrics=Metrics(registry))
        await proxy.start("127.0.0.1", port)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await proxy.close()

    run_fast(main())


def run_fast(coro: object) -> object:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


# -- report ------------------------------------------------------------------------------------------------


def median_rounds(rounds: int, runs: dict[str, object]) -> dict[str, float]:
    results: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name, fn in runs.items():
            value = fn()  # type: ignore[operator]
            results[name].append(value)
            print(f"  round {r + 1}: {name:<28} {value:10.0f}", flush=True)
    return {name: statistics.median(values) for name, values in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64, help="wrk connections in total")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--nginx-workers", default="auto")
    parser.add_argument("--rate", type=float, default=50.0, help="balancing load, requests/s")
    parser.add_argument("--balance-duration", type=float, default=30.0, help="seconds per balancing run")
    parser.add_argument("--write", metavar="FILE", help="replace the 'Proxy' section of this Markdown file")
    parser.add_argument("--serve-proxy", nargs="+", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sse-client", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--balance-client", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_proxy:
        serve_proxy(args.serve_proxy[0], args.serve_proxy[1:])
        return 0
    if args.sse_client:
        streams, duration, *ports = args.sse_client
        print(run_fast(sse_client([int(p) for p in ports], int(streams), float(duration), warmup=1.0)))
        return 0
    if args.balance_client:
        port, rate, duration = args.balance_client
        print(run_fast(balance_client(int(port), float(rate), float(duration), seed=3)))
        return 0
    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if missing:
        print(
            f"Missing {' and '.join(missing)}: install with `sudo apt-get install -y wrk nginx` "
            "(Debian/Ubuntu) or your system's package manager.",
            file=sys.stderr,
        )
        return 1

    with tempfile.TemporaryDirectory(prefix="gpud-bench-") as tmp, processes() as procs:
        workdir = Path(tmp)
        script = wrk_script(workdir)
        print("Small requests (1-token completion, replicas answer at once), requests/s:", flush=True)
        fast = start_sims(procs, 3, "--ttft-ms", "0", "--itl-ms", "0")
        proxy = start_proxy(procs, fast)
        nginx, _ = start_nginx(procs, fast, workdir, args.nginx_workers)
        for port in (proxy, nginx, *fast):
            wrk([port], args.connections, 1, script)  # warm up: connections, pools, caches
        small = median_rounds(
            args.rounds,
            {
                "gpud proxy": lambda: wrk([proxy], args.connections, args.duration, script),
                "nginx least_conn": lambda: wrk([nginx], args.connections, args.duration, script),
                "direct (3 wrk, summed)": lambda: wrk(fast, args.connections, args.duration, script),
            },
        )

        print(f"SSE, {args.streams} concurrent streams (ttft 20 ms, 5 ms/token), events/s:", flush=True)
        streaming = start_sims(procs, 3)
        sse_proxy = start_proxy(procs, streaming)
        streams = median_rounds(
            args.rounds,
            {
                "gpud proxy": lambda: sse([sse_proxy], args.streams, args.duration),
                "direct": lambda: sse(streaming, args.streams, args.duration),
            },
        )

        print(
            f"Balancing, open loop {args.rate:g} req/s, 90 % short / 10 % long, max 4 running per replica, "
            "short-request p99 in ms:",
            flush=True,
        )
        queued = start_sims(procs, 3, "--max-num-seqs", "4")
        bal_proxy = start_proxy(procs, queued)
        bal_lc, bal_rr = start_nginx(procs, queued, workdir, args.nginx_workers)
        p99 = median_rounds(
            args.rounds,
            {
                "gpud proxy": lambda: balance(bal_proxy, args.rate, args.balance_duration),
                "nginx round-robin": lambda: balance(bal_rr, args.rate, args.balance_duration),
                "nginx least_conn": lambda: balance(bal_lc, args.rate, args.balance_duration),
            },
        )

    # (measure, subject, value, reference, reference value, target ratio, higher is better)
    rows: list[tuple[str, str, float, str, float, float | None, bool]] = [
        ("small requests, req/s", "gpud proxy", small["gpud proxy"], "nginx least_conn",
         small["nginx least_conn"], 0.30, True),
        ("small requests, req/s", "gpud proxy", small["gpud proxy"], "direct",
         small["direct (3 wrk, summed)"], None, True),
        ("small requests, req/s", "nginx least_conn", small["nginx least_conn"], "direct",
         small["direct (3 wrk, summed)"], None, True),
        (f"SSE x{args.streams}, events/s", "gpud proxy", streams["gpud proxy"], "direct",
         streams["direct"], 0.90, True),
        ("short p99 (90/10 mix), ms", "gpud proxy", p99["gpud proxy"], "nginx round-robin",
         p99["nginx round-robin"], 0.8, False),
        ("short p99 (90/10 mix), ms", "gpud proxy", p99["gpud proxy"], "nginx least_conn",
         p99["nginx least_conn"], 1.1, False),
    ]  # fmt: skip
    table = [
        "| measure | subject | value | reference | value | ratio | target |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for measure, subject, value, ref, ref_value, target, higher in rows:
        ratio = value / ref_value if ref_value else float("nan")
        verdict = ""
        if target is not None:
            ok = ratio >= target if higher else ratio <= target
            verdict = f"{'≥' if higher else '≤'} {target:.2f} {'✓' if ok else '✗'}"
        table.append(
            f"| {measure} | {subject} | {value:,.0f} | {ref} | {ref_value:,.0f} | {ratio:.2f} | {verdict} |"
        )
    print("\n" + "\n".join(table))
    if args.write:
        write_section(Path(args.write), table, args)
    return 0


NOTES = (
    "Notes: the proxy is one Python process (uvloop) while nginx runs a worker per core. SSE events/s "
    "are bounded by the replicas' token schedule (64 streams × 200 tokens/s ≈ 12,800/s): the ratio says "
    "the proxy keeps up without adding delay. The p99 of short requests is decided by a few unlucky "
    "arrivals queued behind long ones, so it moves by tens of ms between runs; least-connections (gpud, "
    "nginx least_conn) avoids most of them, round-robin does not."
)


def write_section(path: Path, table: list[str], args: argparse.Namespace) -> None:
    command = "python bench/proxy_bench.py " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in (
            ("duration", f"{args.duration:g}"),
            ("rounds", args.rounds),
            ("connections", args.connections),
            ("streams", args.streams),
            ("nginx_workers", args.nginx_workers),
            ("rate", f"{args.rate:g}"),
            ("balance_duration", f"{args.balance_duration:g}"),
        )
    )
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = model.group(1) if model else cpu
    section = "\n".join(
        [
            "## Proxy",
            "",
            f"Measured {datetime.date.today().isoformat()} on {os.cpu_count()} cores ({cpu}), "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}; everything (wrk, "
            f"nginx with `worker_processes {args.nginx_workers}`, the proxy, 3 sim replicas, the SSE client) "
            "shares these cores. Median of the rounds; wrk uses "
            f"{args.connections} connections, each measurement {args.duration:g} s "
            f"({args.balance_duration:g} s at {args.rate:g} req/s for balancing). nginx: keep-alive to the "
            "replicas, `proxy_buffering off`, upstream state in a shared `zone`.",
            "",
            f"    {command}",
            "",
            *table,
            "",
            NOTES,
            "",
        ]
    )
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    # Replace an existing "## Proxy" section (up to the next "## " heading), else append one.
    pattern = re.compile(r"^## Proxy\n.*?(?=^## |\Z)", re.M | re.S)
    text = (
        pattern.sub(section + "\n", text, count=1)
        if pattern.search(text)
        else text.rstrip("\n") + "\n\n" + section
    )
    path.write_text(text)
    print(f"\nWrote the Proxy section of {path}.")


if __name__ == "__main__":
    sys.exit(main())
