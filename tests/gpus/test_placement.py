"""Placement: SPEC §4 examples, refusal messages, invalid requests, and hypothesis checks against brute force.

The brute force here shares nothing with gpud.gpus.placement but the dataclasses: it applies the SPEC rules to
per-GPU replica counts directly and searches every assignment exhaustively.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpud.errors import DoesNotFit, InvalidInput
from gpud.gpus.placement import (
    GpuView,
    PlacementRequest,
    ReplicaPlacement,
    place,
    plan_json,
    validate_request,
)

GiB = 2**30


def gpu(index: int, avail_gib: float, *, total_gib: int = 80, replicas: int = 0, exclusive: bool = False) -> GpuView:
    return GpuView(index, total_gib * GiB, int(avail_gib * GiB), replicas=replicas, exclusive=exclusive)


def gpus_of(result: Sequence[ReplicaPlacement]) -> list[tuple[int, ...]]:
    return [p.gpus for p in result]


# ---- brute force reference ----------------------------------------------------------------------------


def takes(req: PlacementRequest, g: GpuView, n: int) -> bool:
    """Whether GPU g may host n replicas of req, straight from the SPEC rules."""
    if n == 0:
        return True
    if req.gpu_idx is not None and g.index not in req.gpu_idx:
        return False
    if g.exclusive:
        return False
    if req.vram_bytes is None:
        return n == 1 and g.replicas == 0 and g.available_bytes > 0
    if not req.multi_replica and (n > 1 or g.replicas > 0):
        return False
    return n * req.vram_bytes <= g.available_bytes


def brute_caps(req: PlacementRequest, gpus: Sequence[GpuView]) -> tuple[int, ...]:
    caps = []
    for g in gpus:
        n = 0
        while n < req.replicas and takes(req, g, n + 1):
            n += 1
        caps.append(n)
    return tuple(caps)


@cache
def brute_feasible(caps: tuple[int, ...], r: int, k: int) -> bool:
    """Exhaustive: try every K-set for the next replica, recurse on the rest."""
    if r == 0:
        return True
    usable = [i for i, c in enumerate(caps) if c > 0]
    for subset in itertools.combinations(usable, k):
        rest = tuple(c - 1 if i in subset else c for i, c in enumerate(caps))
        if brute_feasible(rest, r - 1, k):
            return True
    return False


def reference_place(req: PlacementRequest, gpus: Sequence[GpuView]) -> list[tuple[int, ...]] | None:
    """The policy as SPEC states it, by brute force: each replica takes the feasible K-set whose sorted
    policy keys are lexicographically smallest, where feasible means the other replicas still fit."""
    views = sorted(gpus, key=lambda g: g.index)
    caps = list(brute_caps(req, views))
    k = req.gpus_per_replica
    if not brute_feasible(tuple(caps), req.replicas, k):
        return None
    counts = [g.replicas for g in views]
    left = [g.available_bytes for g in views]

    def key(i: int) -> tuple[int, ...]:
        if req.policy == "pack":
            return (left[i], views[i].index)
        return (counts[i], -left[i], views[i].index)

    out = []
    for step in range(req.replicas):
        best = None
        for subset in itertools.combinations([i for i, c in enumerate(caps) if c > 0], k):
            rest = tuple(c - 1 if i in subset else c for i, c in enumerate(caps))
            if brute_feasible(rest, req.replicas - step - 1, k):
                cand = sorted(key(i) for i in subset)
                if best is None or cand < best[0]:
                    best = (cand, subset)
        assert best is not None
        for i in best[1]:
            caps[i] -= 1
            counts[i] += 1
            left[i] -= views[i].available_bytes if req.vram_bytes is None else req.vram_bytes
        out.append(tuple(sorted(views[i].index for i in best[1])))
    return out


def check_valid(req: PlacementRequest, gpus: Sequence[GpuView], result: list[ReplicaPlacement], first: int) -> None:
    by_index = {g.index: g for g in gpus}
    assert [p.index for p in result] == list(range(first, first + req.replicas))
    counts = dict.fromkeys(by_index, 0)
    for p in result:
        assert len(p.gpus) == req.gpus_per_replica
        assert list(p.gpus) == sorted(set(p.gpus)), "K distinct GPUs, sorted"
        if req.gpu_idx is not None:
            assert set(p.gpus) <= set(req.gpu_idx)
        expected = tuple(
            by_index[i].available_bytes if req.vram_bytes is None else req.vram_bytes for i in p.gpus
        )
        assert p.vram_by_gpu == expected
        assert p.vram_bytes == min(expected)
        for i in p.gpus:
            counts[i] += 1
    for i, n in counts.items():
        assert takes(req, by_index[i], n), f"GPU{i} cannot host {n} replicas of {req}"


# ---- hypothesis: exactness, validity and policy against brute force ------------------------------------


@st.composite
def instances(draw: st.DrawFn) -> tuple[PlacementRequest, list[GpuView], int]:
    n = draw(st.sampled_from([1, 2, 3, 3, 4, 4, 5, 5, 5]))
    gpus = []
    for i in range(n):
        # Mostly roomy GPUs so multi-GPU replicas fit often; some full, negative or occupied ones.
        avail = draw(st.sampled_from([-1, 0]) | st.integers(1, 16) | st.integers(1, 16))
        exclusive = draw(st.sampled_from([False] * 11 + [True]))
        replicas = 1 if exclusive else draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2]))
        gpus.append(GpuView(i, max(avail, 0) + draw(st.integers(0, 4)), avail, replicas, exclusive))
    gpus = draw(st.permutations(gpus))  # the ledger's order must not matter
    some = st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True).map(tuple)
    gpu_idx = draw(st.sampled_from([None, None, None]) | some)
    k = draw(st.sampled_from([1, 1, 2, 2, 3]))
    req = PlacementRequest(
        replicas=draw(st.sampled_from([1, 1, 2, 2, 3, 4, 5])),
        gpus_per_replica=k,
        vram_bytes=draw(st.sampled_from([None, 1, 1, 2, 2, 3, 4, 6] if k == 1 else [None, 1, 1, 1, 2, 2, 3])),
        gpu_idx=gpu_idx,
        policy=draw(st.sampled_from(["spread", "pack"])),
        multi_replica=draw(st.sampled_from([True, True, True, False])),
    )
    return req, list(gpus), draw(st.integers(0, 3))


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_place_matches_brute_force(case: tuple[PlacementRequest, list[GpuView], int]) -> None:
    req, gpus, first = case
    expected = reference_place(req, gpus)
    try:
        result = place(req, gpus, first_index=first)
    except DoesNotFit as e:
        assert expected is None, f"refused but brute force found {expected}"
        assert e.details == {"plan": plan_json(None, e.message)}
        for g in gpus:  # the message accounts for every GPU
            assert f"GPU{g.index}" in e.message
        return
    assert expected is not None, "placed although brute force finds no assignment"
    check_valid(req, gpus, result, first)
    assert gpus_of(result) == expected, "not the policy's choice among feasible assignments"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=6),
    st.integers(1, 6),
    st.integers(1, 4),
    st.sampled_from(["spread", "pack"]),
)
def test_tight_capacities_are_exact(caps: list[int], r: int, k: int, policy: str) -> None:
    """Pure capacity instances (V=1) including the tight ones where sum(min(c, R)) == R*K exactly."""
    gpus = [GpuView(i, 10, c) for i, c in enumerate(caps)]
    req = PlacementRequest(r, k, 1, policy=policy)
    feasible = brute_feasible(tuple(min(c, r) for c in caps), r, k)
    assert feasible == (sum(min(c, r) for c in caps) >= r * k)  # the oracle the module relies on
    if feasible:
        result = place(req, gpus)
        check_valid(req, gpus, result, 0)
        assert gpus_of(result) == reference_place(req, gpus)
    else:
        with pytest.raises(DoesNotFit):
            place(req, gpus)


# ---- SPEC examples and policies -------------------------------------------------------------------------


def test_spec_spread_example_three_replicas_on_two_equal_gpus() -> None:
    result = place(PlacementRequest(3, vram_bytes=20 * GiB), [gpu(0, 80), gpu(1, 80)])
    assert gpus_of(result) == [(0,), (1,), (0,)]
    assert [p.vram_bytes for p in result] == [20 * GiB] * 3
    assert [p.index for p in result] == [0, 1, 2]


def test_spread_prefers_fewest_replicas_then_most_memory() -> None:
    gpus = [gpu(0, 80, replicas=1), gpu(1, 30), gpu(2, 50)]
    # GPU1 and GPU2 host none: GPU2 first (more memory), then GPU1, then the least loaded again.
    assert gpus_of(place(PlacementRequest(3, vram_bytes=10 * GiB), gpus)) == [(2,), (1,), (0,)]


def test_pack_prefers_least_available_memory_and_keeps_gpus_free() -> None:
    gpus = [gpu(0, 80), gpu(1, 35), gpu(2, 80)]
    assert gpus_of(place(PlacementRequest(4, vram_bytes=10 * GiB, policy="pack"), gpus)) == [
        (1,), (1,), (1,), (0,),
    ]
    spread = place(PlacementRequest(4, vram_bytes=10 * GiB), gpus)
    assert gpus_of(spread) == [(0,), (2,), (1,), (0,)]


def test_pack_ties_go_to_lowest_index() -> None:
    assert gpus_of(place(PlacementRequest(2, vram_bytes=40 * GiB, policy="pack"), [gpu(0, 80), gpu(1, 80)])) == [
        (0,), (0,),
    ]


def test_multi_gpu_replicas_spread_over_distinct_gpus() -> None:
    gpus = [gpu(i, 80) for i in range(4)]
    result = place(PlacementRequest(2, 2, 30 * GiB), gpus)
    assert gpus_of(result) == [(0, 1), (2, 3)]
    assert all(p.vram_by_gpu == (30 * GiB, 30 * GiB) for p in result)


def test_first_index_numbers_new_replicas_after_existing_ones() -> None:
    result = place(PlacementRequest(2, vram_bytes=GiB), [gpu(0, 80)], first_index=5)
    assert [p.index for p in result] == [5, 6]


def test_order_of_gpu_views_does_not_matter() -> None:
    gpus = [gpu(0, 40), gpu(1, 60), gpu(2, 60, replicas=1)]
    req = PlacementRequest(4, 2, 10 * GiB)
    assert place(req, gpus) == place(req, list(reversed(gpus)))


@pytest.mark.parametrize(
    ("avails", "r", "k", "policy", "expected"),
    [
        # First fit / naive pack take (0,1) twice and strand GPU2.
        ([1, 1, 2], 2, 2, "pack", [(0, 2), (1, 2)]),
        ([1, 1, 2], 2, 2, "spread", [(0, 2), (1, 2)]),
        # The brief's example: capacities [2, 2, 2], R=3, K=2 fail with (0,1), (0,1).
        ([2, 2, 2], 3, 2, "pack", [(0, 1), (0, 2), (1, 2)]),
        ([2, 2, 2], 3, 2, "spread", [(0, 1), (0, 2), (1, 2)]),
        # Naive spread takes (0,2) then (3,4) and leaves GPU2 alone for the last replica.
        ([1, 0, 3, 1, 1], 3, 2, "spread", [(0, 2), (2, 3), (2, 4)]),
    ],
)
def test_instances_where_greedy_without_lookahead_fails(
    avails: list[int], r: int, k: int, policy: str, expected: list[tuple[int, ...]]
) -> None:
    gpus = [gpu(i, 10 * a) for i, a in enumerate(avails)]
    req = PlacementRequest(r, k, 10 * GiB, policy=policy)
    result = place(req, gpus)
    check_valid(req, gpus, result, 0)
    assert gpus_of(result) == expected
    assert gpus_of(result) == reference_place(req, gpus)


# ---- exclusive, gpu_idx, single-GPU-multi-replica off ----------------------------------------------------


def test_exclusive_takes_whole_empty_gpus() -> None:
    gpus = [gpu(0, 50, replicas=1), gpu(1, 70), gpu(2, 79), gpu(3, 0)]
    result = place(PlacementRequest(2), gpus)
    assert gpus_of(result) == [(2,), (1,)]
    assert [p.vram_bytes for p in result] == [79 * GiB, 70 * GiB]


def test_exclusive_multi_gpu_reports_each_gpus_reservation() -> None:
    result = place(PlacementRequest(1, 2), [gpu(0, 70), gpu(1, 75)])
    assert result[0].gpus == (0, 1)
    assert result[0].vram_by_gpu == (70 * GiB, 75 * GiB)
    assert result[0].vram_bytes == 70 * GiB
    assert plan_json(result, None) == {
        "fits": True,
        "replicas": [{"index": 0, "gpus": [0, 1], "vram_bytes": 70 * GiB}],
        "reason": None,
    }


def test_exclusive_is_one_replica_per_gpu() -> None:
    with pytest.raises(DoesNotFit) as e:
        place(PlacementRequest(3), [gpu(0, 80), gpu(1, 80)])
    assert e.value.message == (
        "3 replicas with an exclusive GPU each do not fit: GPU0 is free with 80 GiB available; "
        "GPU1 is free with 80 GiB available."
    )


def test_gpu_held_by_exclusive_replica_takes_nothing_more() -> None:
    gpus = [gpu(0, 60, replicas=1, exclusive=True), gpu(1, 20)]
    assert gpus_of(place(PlacementRequest(1, vram_bytes=GiB), gpus)) == [(1,)]
    with pytest.raises(DoesNotFit, match="GPU0 is held by an exclusive replica"):
        place(PlacementRequest(2, vram_bytes=15 * GiB), gpus)


def test_gpu_idx_restricts_the_gpus() -> None:
    gpus = [gpu(i, 80) for i in range(4)]
    result = place(PlacementRequest(3, vram_bytes=10 * GiB, gpu_idx=(3, 1)), gpus)
    assert gpus_of(result) == [(1,), (3,), (1,)]


def test_multi_replica_off_uses_only_empty_gpus_once() -> None:
    gpus = [gpu(0, 80, replicas=1), gpu(1, 80), gpu(2, 40)]
    req = PlacementRequest(2, vram_bytes=10 * GiB, multi_replica=False)
    assert gpus_of(place(req, gpus)) == [(1,), (2,)]
    with pytest.raises(DoesNotFit) as e:
        place(PlacementRequest(3, vram_bytes=10 * GiB, multi_replica=False), gpus)
    assert e.value.message == (
        "3 replicas of 10 GiB do not fit (single-GPU-multi-replica is off, so a GPU hosts at most one "
        "replica): GPU0 already hosts 1 replica; GPU1 has 80 GiB available, room for 1 of the 3 replicas; "
        "GPU2 has 40 GiB available, room for 1 of the 3 replicas."
    )


# ---- refusals -------------------------------------------------------------------------------------------


def test_refusal_says_per_gpu_what_was_needed_and_available() -> None:
    gpus = [gpu(0, 25), gpu(1, 70), gpu(2, 80), gpu(3, -1)]
    with pytest.raises(DoesNotFit) as e:
        place(PlacementRequest(3, vram_bytes=30 * GiB, gpu_idx=(0, 1, 3)), gpus)
    msg = e.value.message
    assert msg == (
        "3 replicas of 30 GiB do not fit: GPU0 has 25 GiB available (needs 30 GiB); "
        "GPU1 has 70 GiB available, room for 2 of the 3 replicas; "
        "GPU3 has no memory available (needs 30 GiB); GPU2 is not in gpu_idx."
    )
    assert e.value.details == {"plan": {"fits": False, "replicas": [], "reason": msg}}
    assert e.value.to_json()["error"]["code"] == "does_not_fit"


def test_refusal_for_multi_gpu_replicas_counts_slots() -> None:
    with pytest.raises(DoesNotFit) as e:
        place(PlacementRequest(2, 2, 30 * GiB), [gpu(0, 100), gpu(1, 40), gpu(2, 10)])
    assert e.value.message == (
        "2 replicas of 30 GiB on 2 GPUs each do not fit (each needs 2 distinct GPUs, 4 GPU slots in all, "
        "and the GPUs offer 3): GPU0 has 100 GiB available, room for both replicas; "
        "GPU1 has 40 GiB available, room for 1 of the 2 replicas; GPU2 has 10 GiB available (needs 30 GiB)."
    )


def test_more_gpus_per_replica_than_allowed_does_not_fit() -> None:
    with pytest.raises(DoesNotFit) as e:
        place(PlacementRequest(1, 3, GiB, gpu_idx=(0, 1)), [gpu(i, 80) for i in range(4)])
    assert e.value.message.startswith(
        "1 replica of 1 GiB on 3 GPUs each does not fit (each replica needs 3 distinct GPUs and only 2 are "
        "allowed): GPU0 has 80 GiB available, room for the replica;"
    )


def test_exclusive_refusal_names_occupied_gpus() -> None:
    with pytest.raises(DoesNotFit) as e:
        place(PlacementRequest(1, 2), [gpu(0, 80), gpu(1, 40, replicas=2), gpu(2, 0)])
    assert "GPU1 already hosts 2 replicas (an exclusive GPU must be empty)" in e.value.message
    assert "GPU2 has no memory available" in e.value.message


def test_no_gpus_at_all() -> None:
    with pytest.raises(DoesNotFit, match="this machine has no GPUs"):
        place(PlacementRequest(1, vram_bytes=GiB), [])


# ---- invalid requests -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("req", "fragment"),
    [
        (PlacementRequest(0, vram_bytes=GiB), "Invalid replicas 0"),
        (PlacementRequest(True, vram_bytes=GiB), "Invalid replicas True"),  # type: ignore[arg-type]
        (PlacementRequest(1, 0, GiB), "Invalid gpus_per_replica 0"),
        (PlacementRequest(1, vram_bytes=0), "Invalid vram 0"),
        (PlacementRequest(1, vram_bytes=-5), "Invalid vram -5"),
        (PlacementRequest(1, vram_bytes=GiB, policy="binpack"), "Invalid placement 'binpack'"),
        (PlacementRequest(1, vram_bytes=GiB, gpu_idx=(0, 2)), "there is no GPU 2 (this machine has GPUs 0, 1)"),
        (PlacementRequest(1, vram_bytes=GiB, gpu_idx=(1, 1)), "GPU 1 is listed more than once"),
        (PlacementRequest(1, vram_bytes=GiB, gpu_idx=()), "name at least one GPU"),
    ],
)
def test_invalid_requests(req: PlacementRequest, fragment: str) -> None:
    gpus = [gpu(0, 80), gpu(1, 80)]
    with pytest.raises(InvalidInput, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        validate_request(req, gpus)
    with pytest.raises(InvalidInput):
        place(req, gpus)


def test_duplicate_gpu_views_are_a_programming_error() -> None:
    with pytest.raises(ValueError):
        place(PlacementRequest(1, vram_bytes=GiB), [gpu(0, 80), gpu(0, 80)])


def test_replica_placement_defaults_vram_by_gpu() -> None:
    p = ReplicaPlacement(0, (1, 2), 5)
    assert p.vram_by_gpu == (5, 5)
    with pytest.raises(ValueError):
        ReplicaPlacement(0, (1, 2), 5, (5,))


def test_plan_json_when_nothing_fits() -> None:
    assert plan_json(None, "no") == {"fits": False, "replicas": [], "reason": "no"}
