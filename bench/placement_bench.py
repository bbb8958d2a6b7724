"""Benchmark gpud placement against exhaustive search.

Run from the repository root:  .venv/bin/python bench/placement_bench.py [--repeats N]

For every scenario it times `gpud.gpus.placement.place` (median and max over repeats) and, where the instance is
small enough, an exhaustive search that tries every multiset of K-GPU sets (the reference the exact
algorithm must agree with). Targets: under 10 ms typical, under 100 ms worst case.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# The bench runs from a checkout, where gpud may not be installed into the interpreter.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpud.errors import DoesNotFit  # noqa: E402
from gpud.gpus.placement import GpuView, PlacementRequest, place  # noqa: E402

GiB = 2**30
MiB = 2**20


@dataclass(frozen=True)
class Scenario:
    name: str
    request: PlacementRequest
    gpus: list[GpuView]
    brute: bool = False  # small enough for exhaustive search


def uniform(n: int, avail_gib: int = 80) -> list[GpuView]:
    return [GpuView(i, 80 * GiB, avail_gib * GiB) for i in range(n)]


def tight(n: int, r: int, k: int, v: int, seed: int) -> list[GpuView]:
    """Heterogeneous GPUs whose capacities (floor(avail / v)) sum to exactly r*k, each at most r.

    Every GPU gets a random leftover below v, so memory never fits one replica more than counted.
    """
    rng = random.Random(seed)
    caps = [rng.randint(0, 2 * r * k // n) for _ in range(n)]
    # Nudge random GPUs until the total is exactly r*k (each cap kept within 0..r).
    while (diff := sum(caps) - r * k) != 0:
        i = rng.randrange(n)
        if diff > 0 and caps[i] > 0:
            caps[i] -= 1
        elif diff < 0 and caps[i] < r:
            caps[i] += 1
    totals = [24, 40, 48, 80, 94, 141]
    gpus = []
    for i, c in enumerate(caps):
        avail = c * v + rng.randrange(v)
        total = max(rng.choice(totals) * GiB, avail)
        gpus.append(GpuView(i, total, avail, replicas=rng.choice([0, 0, 1, 2]) if c else 0))
    return gpus


def short_by_one(gpus: list[GpuView], v: int) -> list[GpuView]:
    """The same machine with one replica-slot less: the request must be refused."""
    i = max(range(len(gpus)), key=lambda j: gpus[j].available_bytes)
    g = gpus[i]
    return [*gpus[:i], GpuView(g.index, g.total_bytes, g.available_bytes - v, g.replicas), *gpus[i + 1:]]


def brute_force(request: PlacementRequest, gpus: Sequence[GpuView]) -> list[tuple[int, ...]] | None:
    """Exhaustive search over multisets of K-sets (replicas are interchangeable), checking memory per GPU."""
    v = request.vram_bytes
    assert v is not None, "the bench only brute-forces sized requests"
    sets = list(itertools.combinations(range(len(gpus)), request.gpus_per_replica))
    used = [0] * len(gpus)
    chosen: list[tuple[int, ...]] = []

    def search(start: int) -> bool:
        if len(chosen) == request.replicas:
            return True
        for s in range(start, len(sets)):
            subset = sets[s]
            if all(used[i] + v <= gpus[i].available_bytes for i in subset):
                for i in subset:
                    used[i] += v
                chosen.append(subset)
                if search(s):
                    return True
                chosen.pop()
                for i in subset:
                    used[i] -= v
        return False

    return list(chosen) if search(0) else None


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """Median and max wall time in ms, and the last result (or the exception raised)."""
    samples = []
    result: object = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        try:
            result = fn()
        except DoesNotFit as e:
            result = e
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples), max(samples), result


def scenarios() -> list[Scenario]:
    out: list[Scenario] = []
    for k, v in ((1, 4 * GiB), (2, 4 * GiB), (4, 4 * GiB)):
        for policy in ("spread", "pack"):
            out.append(Scenario(f"16 GPUs x 64 replicas, K={k}, {policy}", PlacementRequest(64, k, v, policy=policy),
                                uniform(16)))
    v = 1 * GiB
    for n, r, k in ((16, 64, 2), (16, 64, 4), (64, 256, 1), (64, 256, 4), (64, 256, 8)):
        gpus = tight(n, r, k, v, seed=n * 1000 + r + k)
        for policy in ("spread", "pack"):
            out.append(Scenario(f"tight {n} GPUs x {r} replicas, K={k}, {policy}",
                                PlacementRequest(r, k, v, policy=policy), gpus))
    out.append(Scenario("refusal 64 GPUs x 256 replicas, K=4 (one slot short)",
                        PlacementRequest(256, 4, v), short_by_one(tight(64, 256, 4, v, seed=7), v)))
    out.append(Scenario("refusal 16 GPUs x 64 replicas of 30 GiB", PlacementRequest(64, 1, 30 * GiB), uniform(16)))
    # Small instances where exhaustive search is tractable, tight ones included.
    for n, r, k in ((4, 4, 2), (5, 5, 2), (5, 5, 3), (6, 6, 3), (8, 8, 4)):
        gpus = tight(n, r, k, v, seed=n + r + k)
        out.append(Scenario(f"small tight {n} GPUs x {r} replicas, K={k}", PlacementRequest(r, k, v), gpus, True))
    # Refusals make exhaustive search visit every multiset: its cost grows exponentially with the size.
    for n, r, k in ((6, 6, 3), (7, 7, 3), (8, 8, 4)):
        small = tight(n, r, k, v, seed=n + r + k)
        out.append(Scenario(f"small refusal {n} GPUs x {r} replicas, K={k}", PlacementRequest(r, k, v),
                            short_by_one(small, v), True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per scenario (default 30)")
    args = parser.parse_args()

    print(f"# {platform.python_implementation()} {platform.python_version()} on {platform.machine()}, "
          f"{platform.processor() or platform.system()}; {args.repeats} repeats; times in ms")
    header = f"{'scenario':<56} {'result':<8} {'place med':>9} {'place max':>9} {'brute med':>9} {'agree':>5}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for sc in scenarios():
        med, mx, result = timed(lambda sc=sc: place(sc.request, sc.gpus), args.repeats)
        worst = max(worst, mx)
        placed = not isinstance(result, DoesNotFit)
        brute_cell, agree = "n/a", "-"
        if sc.brute:
            bmed, _, bres = timed(lambda sc=sc: brute_force(sc.request, sc.gpus), max(1, min(3, args.repeats // 10)))
            brute_cell = f"{bmed:9.3f}"
            agree = "yes" if (bres is not None) == placed else "NO"
        print(f"{sc.name:<56} {'placed' if placed else 'refused':<8} {med:9.3f} {mx:9.3f} {brute_cell:>9} {agree:>5}")
    print(f"# worst single place() call: {worst:.3f} ms (target < 100 ms)")


if __name__ == "__main__":
    main()
