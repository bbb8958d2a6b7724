"""Benchmark per-model virtualenvs (issue #4), side by side in one run.

Run from the repository root:  .venv/bin/python bench/venv_bench.py [--repeats N] [--heavy REQ…]

1. Model start: a sim model whose venv is already cached vs the same model without a venv, through a real
   `gpud daemon` on simulated GPUs (POST /v1/models until the model is no longer busy). Target: ≤ 100 ms more.
2. Cold build (a key not built yet) through `VenvStore.resolve` vs the same requirements by hand with
   `uv venv` + `uv pip install`, given the same package sources. Target: ≤ 1.3×. With the package cache warm
   (packages already downloaded once, the usual case for a second model) and cold (a fresh UV_CACHE_DIR for
   both sides, so every wheel is downloaded again). Steady state: the base venv that every build copies
   exists already (the first venv of an interpreter creates it once, about 150 ms more).

Prints a Markdown table (paste it into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the bench runs from a checkout, where gpud may not be installed

from benchdaemon import running_daemon  # noqa: E402

from gpud.cli.client import Client  # noqa: E402
from gpud.venv.key import uv_args  # noqa: E402
from gpud.venv.store import VenvStore, find_uv  # noqa: E402

CONFIG = "[supervisor]\nhealth_interval_sec = 0.3\nstop_timeout_sec = 5\ndrain_timeout_sec = 1\n"


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


# ---- 1. model start ------------------------------------------------------------------------------------


@contextlib.contextmanager
def daemon(tmp: Path) -> Iterator[Client]:
    with running_daemon(tmp, "sim:1x80GiB", CONFIG, timeout=20) as d:
        yield d.client


def timed_start(client: Client, body: dict[str, object]) -> float:
    name = str(body["model"])
    start = time.perf_counter()
    client.request("POST", "/v1/models", body)
    shown = client.wait_for_model(name, timeout=120)
    elapsed = time.perf_counter() - start
    if shown is None or shown["state"] != "running":
        raise SystemExit(f"model {name} did not run: {shown}")
    client.request("DELETE", f"/v1/models/{name}")
    client.wait_for_model(name, until_removed=True, timeout=60)
    return elapsed


def bench_start(repeats: int) -> tuple[float, float]:
    plain = {"model": "plain", "engine": "sim", "vram": "1GiB", "args": ["--startup-s", "0"]}
    with_venv = {**plain, "model": "withvenv", "venv": {"packages": ["six"]}}
    with tempfile.TemporaryDirectory(prefix="gpud-vb-", dir="/tmp") as tmp, daemon(Path(tmp)) as client:
        timed_start(client, with_venv)  # builds the venv: not counted
        timed_start(client, plain)  # warms the daemon's paths
        a, b = [], []
        for _ in range(repeats):  # interleaved, so that drift on a shared machine hits both alike
            a.append(timed_start(client, plain))
            b.append(timed_start(client, with_venv))
    return median_ms(a), median_ms(b)


# ---- 2. cold build -------------------------------------------------------------------------------------


def ours(reqs: list[str], root: Path, env: dict[str, str]) -> float:
    """One build of a new key. `root` persists across runs (as STATE_DIR/venvs does): the venv built last
    time is deleted first, the base venv every build copies stays."""
    store = VenvStore(root, environ=env)  # made once at daemon start: not part of a build
    shutil.rmtree(store.path_for(store.key_for(reqs)[0]), ignore_errors=True)
    start = time.perf_counter()
    info = asyncio.run(store.resolve(reqs))
    elapsed = time.perf_counter() - start
    assert info.built
    return elapsed


def by_hand(reqs: list[str], root: Path, env: dict[str, str]) -> float:
    uv, target = find_uv(), root / "by-hand"
    assert uv is not None
    shutil.rmtree(target, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([uv, "venv", "-q", str(target)], check=True, env=env)
    subprocess.run([uv, "pip", "install", "-q", "--python", str(target / "bin" / "python"), *uv_args(env), *reqs],
                   check=True, env=env)
    return time.perf_counter() - start


def bench_build(reqs: list[str], repeats: int, cold_cache: bool) -> tuple[float, float]:
    # Under ~/.cache, on the same file system as uv's cache, so that both sides can hardlink from it.
    with tempfile.TemporaryDirectory(prefix="gpud-vb-", dir=Path.home() / ".cache") as tmp:
        root, env = Path(tmp) / "venvs", dict(os.environ)
        ours(reqs, root, env)  # warm-up: fills the package cache and creates the base venv, not counted
        by_hand(reqs, root, env)
        a, b = [], []
        for i in range(repeats):
            mine, theirs = env, env
            if cold_cache:  # a fresh, empty package cache for each side: every wheel is downloaded again
                mine = {**env, "UV_CACHE_DIR": str(Path(tmp) / f"uv-cache-{i}-gpud")}
                theirs = {**env, "UV_CACHE_DIR": str(Path(tmp) / f"uv-cache-{i}-by-hand")}
            a.append(ours(reqs, root, mine))
            b.append(by_hand(reqs, root, theirs))
    return median_ms(a), median_ms(b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold-repeats", type=int, default=2)
    parser.add_argument("--small", nargs="+", default=["six"])
    parser.add_argument("--medium", nargs="+", default=["requests", "numpy", "pyyaml"])
    parser.add_argument("--heavy", nargs="*", default=["torch"], help="a vLLM-sized set; empty to skip")
    args = parser.parse_args()
    if find_uv() is None:
        raise SystemExit("uv is not installed: `pip install uv` (gpud uses it, and the comparison needs it)")

    rows = []
    plain, venv = bench_start(args.repeats)
    rows.append(("model start (sim), cached venv vs no venv", venv, plain, f"+{venv - plain:.0f} ms"))
    sets = [("small", args.small, False), ("medium", args.medium, False)]
    if args.heavy:
        sets.append(("heavy", args.heavy, False))
    sets.append(("medium", args.medium, True))
    for label, reqs, cold in sets:
        repeats = args.cold_repeats if cold else args.repeats
        mine, hand = bench_build(reqs, repeats, cold)
        cache = "cold package cache" if cold else "warm package cache"
        rows.append((f"cold build, {label} `{' '.join(reqs)}`, {cache}", mine, hand, f"{mine / hand:.2f}×"))
        print(f"  {rows[-1]}", file=sys.stderr)

    print(f"`python bench/venv_bench.py` ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, CPython {platform.python_version()}, {args.repeats} repeats, "
          f"{args.cold_repeats} for the cold cache; medians in ms)\n")
    print("| case | gpud | reference | difference |")
    print("| --- | ---: | ---: | ---: |")
    for case, mine, ref, diff in rows:
        print(f"| {case} | {mine:.0f} | {ref:.0f} | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
