"""Cluster benchmark: two gpud nodes behind the Shepherd Model Gateway, against a client that spreads its
requests over the two nodes itself, in one run (SPEC §16, docs/cluster.md).

    .venv/bin/python bench/cluster_bench.py [--duration 5] [--rounds 3] [--connections 64] [--replicas 2]
                                            [--policy round_robin]

Set-up, all on this machine and on 127.0.0.1: two real `gpud daemon`s on simulated GPUs, each running the sim
model "sim" with `--replicas` replicas that answer at once (`--ttft-ms 0`), each registered with one `smg
launch` by its own registrar (`[cluster]`). Then, for both targets,

- through the gateway: `wrk` POSTs a one-token completion (model in the JSON body) to SMG, which balances
  over the two workers `http://127.0.0.1:PORT/m/sim`;
- client-side spread: one `wrk` per node, at the same time, half the connections each, to the nodes' own
  `/v1/completions`, summed (what a client that knows both nodes can do without a gateway);

it measures requests/s at `--connections` and the latency of one connection alone (p50 / p99: the hop the
gateway adds). Each measurement runs `--rounds` times, interleaved; medians are reported.

Needs `wrk` on PATH (Debian/Ubuntu: `sudo apt-get install -y wrk`) and `smg` (`pip install 'gpud[cluster]'`).
The gateway, the two daemons, their replicas and wrk share the machine's cores, so on a small box the
numbers say how the set-ups compare, not what either does on real hardware.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdaemon import BenchDaemon, running_daemon  # noqa: E402 - after the path setup above
from wrkrun import run_wrk  # noqa: E402

from gpud.supervise.supervisor import free_port  # noqa: E402

MODEL = "sim"
BODY = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1})
FAST = "[supervisor]\nhealth_interval_sec = 1\n"


def find_smg() -> str:
    found = shutil.which("smg", path=str(Path(sys.executable).parent)) or shutil.which("smg")
    if found is None:
        raise SystemExit("smg is not installed: pip install 'gpud[cluster]' (or pip install smg).")
    return found


@contextlib.contextmanager
def gateway(workdir: Path, policy: str) -> Iterator[int]:
    port = free_port(set())
    metrics = free_port({port})
    log = open(workdir / "smg.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [find_smg(), "launch", "--host", "127.0.0.1", "--port", str(port), "--prometheus-host", "127.0.0.1",
         "--prometheus-port", str(metrics), "--policy", policy, "--log-level", "warn",
         "--shutdown-grace-period-secs", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        until(lambda: get_json(port, "/health") is not None, 20, "the gateway to listen", proc)
        yield port
    finally:
        proc.kill()
        proc.wait()
        log.close()


def get_json(port: int, path: str) -> object | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            raw = resp.read()
    except OSError:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def until(predicate: object, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what}: the process exited with code {proc.returncode}.")
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise SystemExit(f"timed out after {timeout:g} s waiting for {what}.")


def ready_workers(port: int) -> int:
    doc = get_json(port, "/workers")
    workers = doc.get("workers", []) if isinstance(doc, dict) else []
    return sum(1 for w in workers if isinstance(w, dict) and w.get("status") == "ready")


def node_config(gateway_port: int, node_port: int) -> str:
    return (FAST + f'[cluster]\ngateway = "http://127.0.0.1:{gateway_port}"\n'
            f'advertise = "http://127.0.0.1:{node_port}"\nsync_sec = 2\nhealth_interval_sec = 2\n')


@contextlib.contextmanager
def cluster(workdir: Path, replicas: int, policy: str) -> Iterator[tuple[int, list[BenchDaemon]]]:
    """The gateway and two nodes, each serving MODEL, both registered and ready on the gateway."""
    with gateway(workdir, policy) as gw, contextlib.ExitStack() as stack:
        nodes = []
        for i in range(2):
            root = workdir / f"node{i}"
            root.mkdir()
            port = free_port(set())
            nodes.append(stack.enter_context(running_daemon(root, "sim:2x80GiB", node_config(gw, port), port=port)))
        for node in nodes:
            node.client.request("POST", "/v1/models", {"name": MODEL, "model": MODEL, "engine": "sim",
                                                       "replicas": replicas, "vram": "10GiB",
                                                       "args": ["--startup-s", "0", "--ttft-ms", "0"]})
        until(lambda: ready_workers(gw) == 2, 60, "both workers to be ready on the gateway")
        yield gw, nodes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64, help="wrk connections in total")
    parser.add_argument("--replicas", type=int, default=2, help="sim replicas per node")
    parser.add_argument("--policy", default="round_robin", help="the gateway's --policy")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not on PATH (Debian/Ubuntu: sudo apt-get install -y wrk).")
    find_smg()
    runs: dict[str, list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="gpud-cluster-bench-") as tmp:
        workdir = Path(tmp)
        script = workdir / "post.lua"
        script.write_text(f'wrk.method = "POST"\nwrk.body = \'{BODY}\'\nwrk.headers["Content-Type"] = '
                          '"application/json"\n')
        with cluster(workdir, args.replicas, args.policy) as (gw, nodes):
            targets = {"gateway": [gw], "spread": [n.port for n in nodes]}
            for _ in range(args.rounds):
                for name, ports in targets.items():
                    runs.setdefault(f"{name} load", []).append(astuple(run_wrk(ports, args.connections, args.duration, script)))
                    # One connection, to one place: the gateway, or one node (what one request costs).
                    runs.setdefault(f"{name} alone", []).append(astuple(run_wrk(ports[:1], 1, args.duration, script)))
    med = {k: tuple(statistics.median(r[i] for r in v) for i in range(3)) for k, v in runs.items()}
    cpu = platform.processor() or platform.machine()
    print(f"\n{datetime.date.today()}, {cpu}, Python {platform.python_version()}, {args.rounds} rounds of "
          f"{args.duration:g} s, {args.connections} connections, {args.replicas} sim replicas per node, "
          f"SMG --policy {args.policy}\n")
    gw_rps, spread_rps = med["gateway load"][0], med["spread load"][0]
    rows = [
        ("requests/s, " + f"{args.connections} connections", f"{gw_rps:,.0f}", f"{spread_rps:,.0f}",
         f"{gw_rps / spread_rps:.2f}"),
        ("p50 / p99 latency at that load, ms", f"{med['gateway load'][1]:.2f} / {med['gateway load'][2]:.2f}",
         f"{med['spread load'][1]:.2f} / {med['spread load'][2]:.2f}", ""),
        ("p50 / p99 latency, 1 connection, ms", f"{med['gateway alone'][1]:.2f} / {med['gateway alone'][2]:.2f}",
         f"{med['spread alone'][1]:.2f} / {med['spread alone'][2]:.2f}",
         f"+{med['gateway alone'][1] - med['spread alone'][1]:.2f} ms p50"),
    ]
    print("| measure | through SMG | client-side spread | SMG vs spread |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
