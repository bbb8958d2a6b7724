"""Proxy benchmark: gpud's proxy side by side with nginx and with direct connections, in one run.

    .venv/bin/python bench/proxy_bench.py [--duration 5] [--rounds 3] [--connections 64] [--streams 64]
                                          [--nginx-workers auto] [--write docs/benchmarks.md]

What it measures, on sim replicas (`python -m gpud.simserver`, no GPU needed):

1. Small-request throughput: `wrk` POSTs a one-token completion (model named in the JSON body, as OpenAI
   clients do) to 3 replicas that answer at once (`--ttft-ms 0`), for each of
   - gpud's proxy (its own process, uvloop, metrics on: what `gpud daemon` runs),
   - nginx with `least_conn` and keep-alive to the same replicas,
   - direct: one wrk per replica at the same time, summed (the replicas' own ceiling).
2. SSE: `--streams` concurrent streaming completions (20 ms to the first token, 5 ms between tokens, as
   the sim's defaults) through the proxy and direct to the replicas; events (SSE `data:` lines) per second
   received by the client.

Each measurement runs `--rounds` times, interleaved, and the median is reported, because on a small box
other load moves single numbers. Targets (issue #3): proxy ≥ 0.30 × nginx least_conn req/s, and SSE
through the proxy ≥ 0.90 × direct events/s.

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
            [sys.executable, "-m", "gpud.simserver", "--host", "127.0.0.1", "--port", str(port), "--startup-s", "0",
             "--served-model-name", MODEL, *args],
            cwd=ROOT, stdout=subprocess.DEVNULL,
        )
        procs.append(proc)
        ports.append(port)
    for port, proc in zip(ports, procs[-n:]):
        wait_listening(port, proc, "simserver")
    return ports


def start_proxy(procs: list[subprocess.Popen[bytes]], backends: list[int]) -> int:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-proxy", str(port), *map(str, backends)], cwd=ROOT)
    procs.append(proc)
    wait_listening(port, proc, "gpud proxy")
    return port


def start_nginx(procs: list[subprocess.Popen[bytes]], backends: list[int], workdir: Path, workers: str) -> int:
    port = free_port()
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / sub).mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
worker_processes {workers};
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    upstream sims {{
        least_conn;
{servers}
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sims;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)], stdout=subprocess.DEVNULL)
    procs.append(proc)
    wait_listening(port, proc, "nginx")
    return port


# -- small requests (wrk) --------------------------------------------------------------------------------------

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
            ["wrk", "-t1", f"-c{per}", f"-d{duration:g}s", "-s", str(script), f"http://127.0.0.1:{p}/v1/completions"],
            stdout=subprocess.PIPE, text=True,
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
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
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
    return rate


def sse(ports: list[int], streams: int, duration: float) -> float:
    """Run the SSE client in its own process (uvloop), so the bench's own loop does not share its core."""
    out = subprocess.run(
        [sys.executable, __file__, "--sse-client", str(streams), str(duration), *map(str, ports)],
        cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


# -- internal modes ----------------------------------------------------------------------------------------

def serve_proxy(port: int, backends: list[int]) -> None:
    """The proxy as `gpud daemon` runs it: registry of READY replicas, metrics on, uvloop."""
    from gpud.metrics import Metrics
    from gpud.proxy import Proxy
    from gpud.registry import Model, Registry, Replica, ReplicaState
    from gpud.spec import ModelSpec

    registry = Registry()
    model = Model(spec=ModelSpec(name=MODEL, model=MODEL, engine="sim", replicas=len(backends)))
    for i, backend in enumerate(backends):
        model.replicas[i] = Replica(model=MODEL, index=i, gpus=(), vram_by_gpu=(), port=backend,
                                    state=ReplicaState.READY)
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
    parser.add_argument("--write", metavar="FILE", help="replace the 'Proxy' section of this Markdown file")
    parser.add_argument("--serve-proxy", nargs="+", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sse-client", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_proxy:
        serve_proxy(args.serve_proxy[0], args.serve_proxy[1:])
        return 0
    if args.sse_client:
        streams, duration, *ports = args.sse_client
        print(run_fast(sse_client([int(p) for p in ports], int(streams), float(duration), warmup=1.0)))
        return 0
    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if missing:
        print(f"Missing {' and '.join(missing)}: install with `sudo apt-get install -y wrk nginx` "
              "(Debian/Ubuntu) or your system's package manager.", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="gpud-bench-") as tmp, processes() as procs:
        workdir = Path(tmp)
        script = wrk_script(workdir)
        print("Small requests (1-token completion, replicas answer at once), requests/s:", flush=True)
        fast = start_sims(procs, 3, "--ttft-ms", "0", "--itl-ms", "0")
        proxy = start_proxy(procs, fast)
        nginx = start_nginx(procs, fast, workdir, args.nginx_workers)
        for port in (proxy, nginx, *fast):
            wrk([port], args.connections, 1, script)  # warm up: connections, pools, caches
        small = median_rounds(args.rounds, {
            "gpud proxy": lambda: wrk([proxy], args.connections, args.duration, script),
            "nginx least_conn": lambda: wrk([nginx], args.connections, args.duration, script),
            "direct (3 wrk, summed)": lambda: wrk(fast, args.connections, args.duration, script),
        })

        print(f"SSE, {args.streams} concurrent streams (ttft 20 ms, 5 ms/token), events/s:", flush=True)
        streaming = start_sims(procs, 3)
        sse_proxy = start_proxy(procs, streaming)
        streams = median_rounds(args.rounds, {
            "gpud proxy": lambda: sse([sse_proxy], args.streams, args.duration),
            "direct": lambda: sse(streaming, args.streams, args.duration),
        })

    rows = [
        ("small requests, req/s", "gpud proxy", small["gpud proxy"], "nginx least_conn", small["nginx least_conn"],
         0.30),
        ("small requests, req/s", "gpud proxy", small["gpud proxy"], "direct", small["direct (3 wrk, summed)"], None),
        ("nginx vs direct, req/s", "nginx least_conn", small["nginx least_conn"], "direct",
         small["direct (3 wrk, summed)"], None),
        (f"SSE x{args.streams}, events/s", "gpud proxy", streams["gpud proxy"], "direct", streams["direct"], 0.90),
    ]
    table = ["| measure | subject | value | reference | value | ratio | target |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for measure, subject, value, ref, ref_value, target in rows:
        ratio = value / ref_value if ref_value else float("nan")
        verdict = "" if target is None else f"≥ {target:.2f} {'✓' if ratio >= target else '✗'}"
        table.append(f"| {measure} | {subject} | {value:,.0f} | {ref} | {ref_value:,.0f} | {ratio:.2f} | {verdict} |")
    print("\n" + "\n".join(table))
    if args.write:
        write_section(Path(args.write), table, args)
    return 0


def write_section(path: Path, table: list[str], args: argparse.Namespace) -> None:
    command = "python bench/proxy_bench.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in (
            ("duration", f"{args.duration:g}"), ("rounds", args.rounds), ("connections", args.connections),
            ("streams", args.streams), ("nginx_workers", args.nginx_workers))
    )
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = model.group(1) if model else cpu
    section = "\n".join([
        "## Proxy",
        "",
        f"Measured {datetime.date.today().isoformat()} on {os.cpu_count()} cores ({cpu}), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}; everything (wrk, "
        f"nginx with `worker_processes {args.nginx_workers}`, the proxy, 3 sim replicas, the SSE client) shares "
        "these cores. Median of the rounds; wrk uses "
        f"{args.connections} connections, each measurement {args.duration:g} s.",
        "",
        f"    {command}",
        "",
        *table,
        "",
    ])
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    # Replace an existing "## Proxy" section (up to the next "## " heading), else append one.
    pattern = re.compile(r"^## Proxy\n.*?(?=^## |\Z)", re.M | re.S)
    text = pattern.sub(section + "\n", text, count=1) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    print(f"\nWrote the Proxy section of {path}.")


if __name__ == "__main__":
    sys.exit(main())
