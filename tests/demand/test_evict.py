"""The eviction planner against brute force (as tests/gpus/test_placement.py proves the placement).

The brute force shares nothing with gpud.demand.evict but the dataclasses: it rebuilds each GPU's view from
the reservations left, decides feasibility by trying every assignment of replicas to GPU sets, and checks
every prefix and every subset of the candidates exhaustively.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpud.demand.evict import GpuRoom, plan_eviction, views_without
from gpud.gpus.base import DeviceReading
from gpud.gpus.ledger import Ledger, Reservation
from gpud.gpus.placement import GpuView, PlacementRequest, ReplicaPlacement
from gpud.gpus.sim import SimBackend, parse_sim_spec

GiB = 2**30


# ---- brute force --------------------------------------------------------------------------------------


def brute_views(gpus: Sequence[GpuRoom], holdings: Sequence[Reservation], released: Collection[str]) -> list[GpuView]:
    """Each GPU after `released` let go of everything, per the ledger's formula (SPEC §4)."""
    kept = [r for r in holdings if r.model not in released]
    out = []
    for g in gpus:
        reserved = 0
        hosted = 0
        exclusive = False
        for r in kept:
            for gpu, vram in zip(r.gpus, r.vram_by_gpu, strict=True):
                if gpu == g.index:
                    reserved += vram
                    hosted += 1
                    exclusive = exclusive or r.exclusive
        available = g.free_bytes - reserved if g.ok else 0
        out.append(GpuView(g.index, g.total_bytes, max(0, available), hosted, exclusive))
    return out


def hosts(req: PlacementRequest, g: GpuView, n: int) -> bool:
    """Whether GPU g may host n replicas of req, straight from SPEC §4."""
    if n == 0:
        return True
    if (req.gpu_idx is not None and g.index not in req.gpu_idx) or g.exclusive:
        return False
    if req.vram_bytes is None:
        return n == 1 and g.replicas == 0 and g.available_bytes > 0
    if not req.multi_replica and (n > 1 or g.replicas > 0):
        return False
    return n * req.vram_bytes <= g.available_bytes


def brute_fits(req: PlacementRequest, views: Sequence[GpuView]) -> bool:
    """Try every way to give each replica K distinct GPUs (replicas are alike: count per GPU)."""

    def search(left: int, counts: tuple[int, ...]) -> bool:
        if left == 0:
            return True
        for subset in itertools.combinations(range(len(views)), req.gpus_per_replica):
            grown = tuple(c + (i in subset) for i, c in enumerate(counts))
            if all(hosts(req, views[i], grown[i]) for i in subset) and search(left - 1, grown):
                return True
        return False

    return search(req.replicas, (0,) * len(views))


def check_placements(req: PlacementRequest, views: Sequence[GpuView], result: list[ReplicaPlacement]) -> None:
    by_index = {g.index: g for g in views}
    assert len(result) == req.replicas
    counts = dict.fromkeys(by_index, 0)
    for p in result:
        assert len(set(p.gpus)) == len(p.gpus) == req.gpus_per_replica
        for i in p.gpus:
            counts[i] += 1
    for i, n in counts.items():
        assert hosts(req, by_index[i], n), f"GPU{i} cannot host {n} replicas after the eviction"


# ---- instances ------------------------------------------------------------------------------------------


@st.composite
def instances(draw: st.DrawFn) -> tuple[PlacementRequest, list[GpuRoom], list[Reservation], list[str]]:
    n = draw(st.integers(1, 3))
    gpus = [GpuRoom(i, 16, draw(st.integers(-2, 12)), ok=draw(st.sampled_from([True] * 9 + [False])))
            for i in range(n)]
    holdings: list[Reservation] = []
    models = [f"m{j}" for j in range(draw(st.integers(1, 5)))]
    for name in models:
        for replica in range(draw(st.integers(1, 2))):
            k = draw(st.integers(1, n))
            chosen = tuple(sorted(draw(st.permutations(range(n)))[:k]))
            exclusive = draw(st.sampled_from([False] * 7 + [True]))
            vram = tuple(draw(st.integers(0, 6)) for _ in chosen)
            holdings.append(Reservation(name, replica, chosen, vram, exclusive))
    lru = draw(st.permutations(models))
    lru = lru[: draw(st.integers(0, len(lru)))]  # the others are not evictable
    k = draw(st.integers(1, min(2, n)))
    req = PlacementRequest(
        replicas=draw(st.integers(1, 3)),
        gpus_per_replica=k,
        vram_bytes=draw(st.sampled_from([None, 1, 2, 3, 4, 6])),
        gpu_idx=draw(st.sampled_from([None, None]) | st.lists(st.integers(0, n - 1), min_size=1, max_size=n,
                                                               unique=True).map(tuple)),
        policy=draw(st.sampled_from(["spread", "pack"])),
        multi_replica=draw(st.sampled_from([True, True, False])),
    )
    return req, gpus, holdings, list(lru)


@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_plan_matches_brute_force(case: tuple[PlacementRequest, list[GpuRoom], list[Reservation], list[str]]) -> None:
    req, gpus, holdings, lru = case
    fits = [brute_fits(req, brute_views(gpus, holdings, lru[:k])) for k in range(len(lru) + 1)]
    assert fits == sorted(fits), "feasibility is monotone along the prefixes (the planner relies on it)"
    plan = plan_eviction(req, gpus, holdings, lru)
    if not any(fits):
        assert plan is None, "planned an eviction although evicting every candidate does not help"
        return
    assert plan is not None, "found no plan although evicting candidates makes the request fit"
    shortest = fits.index(True)
    evicted = list(plan.evict)
    # Only candidates, each at most once, in LRU order, from the shortest prefix that fits, and its last one.
    assert evicted == [n for n in lru[:shortest] if n in evicted]
    if shortest:
        assert lru[shortest - 1] in evicted
    else:
        assert evicted == [], "evicted something although the request fit as things were"
    after = brute_views(gpus, holdings, evicted)
    assert brute_fits(req, after)
    check_placements(req, after, plan.placements)
    for name in evicted:  # minimal: sparing any one of them makes the request not fit
        assert not brute_fits(req, brute_views(gpus, holdings, [n for n in evicted if n != name]))


def test_least_recently_used_go_first_and_only_as_many_as_needed() -> None:
    # One 80 GiB GPU holding three 20 GiB models; a 40 GiB request needs two of them gone (20 GiB is free).
    gpus = [GpuRoom(0, 80 * GiB, 80 * GiB)]
    holdings = [Reservation(name, 0, (0,), (20 * GiB,)) for name in ("old", "mid", "new")]
    req = PlacementRequest(1, 1, 40 * GiB)
    plan = plan_eviction(req, gpus, holdings, ["old", "mid", "new"])
    assert plan is not None and plan.evict == ("old",)
    plan = plan_eviction(PlacementRequest(1, 1, 60 * GiB), gpus, holdings, ["old", "mid", "new"])
    assert plan is not None and plan.evict == ("old", "mid")


def test_a_model_whose_memory_would_not_help_is_spared() -> None:
    # The least recently used model sits on GPU1; the request may only use GPU0.
    gpus = [GpuRoom(0, 80 * GiB, 80 * GiB), GpuRoom(1, 80 * GiB, 80 * GiB)]
    holdings = [Reservation("elsewhere", 0, (1,), (70 * GiB,)), Reservation("here", 0, (0,), (70 * GiB,))]
    plan = plan_eviction(PlacementRequest(1, 1, 40 * GiB, gpu_idx=(0,)), gpus, holdings, ["elsewhere", "here"])
    assert plan is not None and plan.evict == ("here",)


def test_nothing_is_planned_when_eviction_would_not_help() -> None:
    gpus = [GpuRoom(0, 80 * GiB, 80 * GiB)]
    holdings = [Reservation("pinned", 0, (0,), (60 * GiB,)), Reservation("idle", 0, (0,), (10 * GiB,))]
    # 40 GiB needs "pinned" gone, which is not evictable: evicting "idle" alone would not help.
    assert plan_eviction(PlacementRequest(1, 1, 40 * GiB), gpus, holdings, ["idle"]) is None


def test_views_without_nothing_are_the_ledgers_views() -> None:
    backend = SimBackend(parse_sim_spec("sim:80GiB,40GiB@10GiB,24GiB"))
    ledger = Ledger(backend, headroom_bytes=GiB)
    ledger.reserve([Reservation("a", 0, (0, 1), (20 * GiB, 5 * GiB)), Reservation("b", 0, (2,), (23 * GiB,), True)])
    devices: list[DeviceReading] = ledger.devices()
    rooms = [GpuRoom(d.index, d.total_bytes, ledger.free_bytes(d.index), d.ok) for d in devices]
    assert views_without(rooms, ledger.reservations()) == ledger.views()
    assert views_without(rooms, ledger.reservations(), ["a", "b"]) == [
        GpuView(0, 80 * GiB, 79 * GiB), GpuView(1, 40 * GiB, 29 * GiB), GpuView(2, 24 * GiB, 23 * GiB)
    ]


@pytest.mark.parametrize("replacing", [["a"], []])
def test_the_ledger_hands_an_evicted_models_room_over_whole(replacing: list[str]) -> None:
    ledger = Ledger(SimBackend(parse_sim_spec("sim:80GiB")), headroom_bytes=0)
    ledger.reserve([Reservation("a", 0, (0,), (60 * GiB,))])
    new = [Reservation("b", 0, (0,), (70 * GiB,))]
    if not replacing:
        with pytest.raises(Exception, match="needs 70 GiB but has 20 GiB"):
            ledger.reserve(new)
        return
    ledger.reserve(new, replacing=replacing)
    # Both are counted until "a" is gone: nobody else can place on the room meanwhile.
    assert ledger.reserved(0) == 130 * GiB and ledger.views()[0].available_bytes == 0
    ledger.release_model("a")
    assert ledger.reserved(0) == 70 * GiB
