"""Placement: a pure function that assigns a model's replicas to GPUs, exactly, or says why it cannot.

The ledger describes each GPU (`GpuView`); a request (`PlacementRequest`) asks for R replicas of K distinct
GPUs each, with V bytes per GPU per replica (or exclusive GPUs when V is None). `place` returns one
`ReplicaPlacement` per replica or raises `DoesNotFit` carrying the JSON plan. Nothing here does I/O, so the
daemon can call it under its ledger lock and reserve the result all or nothing.

Why it is exact
---------------
All replicas of one request are identical, so GPU i can host at most c_i of them (its *capacity*:
floor(available / V), or 0/1 for exclusive requests and when single-GPU-multi-replica is off). Choosing
R K-sets of distinct GPUs with GPU i in at most c_i of them is finding an R x n 0/1 matrix with row sums K
and column sums <= c_i. By the Gale-Ryser theorem (uniform row sums make its conditions collapse), such a
matrix exists iff

    sum_i min(c_i, R) >= R * K                                            (the feasibility oracle)

A plain greedy (lowest index first) is not exact: capacities [2, 2, 2], R=3, K=2 fail with (0,1), (0,1)
but (0,1), (0,2), (1,2) works. So the replicas are built one at a time, each taking the K GPUs the policy
prefers *among the choices that keep the remaining replicas feasible*. With r replicas left (this one
included), taking a GPU with c_i >= r costs the oracle's left side nothing for the remaining r-1, while a
GPU with c_i < r costs exactly 1. So a choice keeps feasibility iff it uses at most

    slack = sum_i min(c_i, r-1) - (r-1) * K

GPUs with c_i < r. That is a partition-matroid constraint, so walking the GPUs in policy order and taking
each one unless it is a "low" GPU and the slack is spent yields the lexicographically best feasible set.
A feasible set always exists when the oracle holds (shown in `_choose`), so the loop never gets stuck.

Policies
--------
spread: fewest replicas (already hosted + placed by this request), then most available memory left,
        then lowest index -- 3 replicas on 2 equal GPUs land on GPU0, GPU1, GPU0.
pack:   least available memory left (that still fits), then lowest index -- keeps whole GPUs free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gpud.errors import DoesNotFit, InvalidInput
from gpud.units import format_size

POLICIES = ("spread", "pack")


@dataclass(frozen=True)
class GpuView:
    """What the ledger tells placement about one GPU."""

    index: int
    total_bytes: int
    available_bytes: int  # total - used by others - gpud reservations - headroom (may be <= 0)
    replicas: int = 0  # replicas (of any model) already hosted on this GPU
    exclusive: bool = False  # True when an exclusive replica already holds this GPU


@dataclass(frozen=True)
class PlacementRequest:
    """What one start (or scale-up) asks for; see SPEC §4."""

    replicas: int  # R >= 1
    gpus_per_replica: int = 1  # K >= 1
    vram_bytes: int | None = None  # V per GPU per replica; None = exclusive GPUs
    gpu_idx: tuple[int, ...] | None = None  # allowed GPUs (None = all)
    policy: str = "spread"  # "spread" | "pack"
    multi_replica: bool = True  # single-GPU-multi-replica switch


@dataclass(frozen=True)
class ReplicaPlacement:
    """Where one replica goes and what it reserves on each of its GPUs.

    `vram_by_gpu` follows `gpus` in order: V on every GPU for a sized request, each GPU's whole available
    memory for an exclusive one. `vram_bytes` is the smallest of them (the figure the JSON plan shows).
    Left empty, `vram_by_gpu` is filled with `vram_bytes` for every GPU (handy when rebuilding from state).
    """

    index: int
    gpus: tuple[int, ...]
    vram_bytes: int
    vram_by_gpu: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.vram_by_gpu:
            object.__setattr__(self, "vram_by_gpu", (self.vram_bytes,) * len(self.gpus))
        if len(self.vram_by_gpu) != len(self.gpus):
            raise ValueError("vram_by_gpu must give one amount per GPU of the replica")


def plan_json(placements: list[ReplicaPlacement] | None, reason: str | None) -> dict[str, Any]:
    """The plan as the API and `--dry-run` show it: {"fits", "replicas": [...], "reason"}."""
    return {
        "fits": placements is not None,
        "replicas": [
            {"index": p.index, "gpus": list(p.gpus), "vram_bytes": p.vram_bytes} for p in placements or []
        ],
        "reason": reason,
    }


def _is_int(value: object) -> bool:
    # bool is an int subclass; True replicas is a caller bug, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _gpu_list(indices: Sequence[int]) -> str:
    return ", ".join(str(i) for i in indices) if indices else "none"


def validate_request(request: PlacementRequest, gpus: Sequence[GpuView]) -> None:
    """Raise InvalidInput for a request that is malformed whatever the GPUs hold.

    Asking for more GPUs per replica than are allowed is not malformed: it is refused by `place` as
    DoesNotFit, because the answer depends on the machine, not on the request alone.
    """
    seen_gpus = [g.index for g in gpus]
    if len(set(seen_gpus)) != len(seen_gpus):
        # The ledger builds the views; duplicates are a programming error, not user input.
        raise ValueError(f"GPU views repeat an index: {seen_gpus}")
    r, k, v = request.replicas, request.gpus_per_replica, request.vram_bytes
    if not _is_int(r) or r < 1:
        raise InvalidInput(f"Invalid replicas {r!r}: a model needs at least 1 replica.")
    if not _is_int(k) or k < 1:
        raise InvalidInput(f"Invalid gpus_per_replica {k!r}: each replica needs at least 1 GPU.")
    if v is not None and (not _is_int(v) or v <= 0):
        raise InvalidInput(
            f"Invalid vram {v!r}: give a positive size such as 20GiB, or leave it out for exclusive GPUs."
        )
    if request.policy not in POLICIES:
        raise InvalidInput(f"Invalid placement {request.policy!r}: use spread or pack.")
    if request.gpu_idx is not None:
        idx = list(request.gpu_idx)
        if not idx:
            raise InvalidInput("Invalid gpu_idx []: name at least one GPU, or leave it out to allow all.")
        for i in idx:
            if not _is_int(i):
                raise InvalidInput(f"Invalid gpu_idx {idx!r}: GPU indices are whole numbers.")
        dups = sorted({i for i in idx if idx.count(i) > 1})
        if dups:
            raise InvalidInput(f"Invalid gpu_idx {idx!r}: GPU {dups[0]} is listed more than once.")
        missing = sorted(set(idx) - set(seen_gpus))
        if missing:
            raise InvalidInput(
                f"Invalid gpu_idx {idx!r}: there is no GPU {missing[0]} "
                f"(this machine has GPUs {_gpu_list(sorted(seen_gpus))})."
            )


def _capacity(request: PlacementRequest, gpu: GpuView) -> int:
    """How many replicas of this request the GPU can host on its own (before the oracle)."""
    if request.gpu_idx is not None and gpu.index not in request.gpu_idx:
        return 0
    if gpu.exclusive:
        return 0  # an exclusive replica takes nothing beside it
    v = request.vram_bytes
    if v is None:
        # Exclusive: the GPU must be empty and have something to reserve; one replica of ours per GPU.
        return 1 if gpu.replicas == 0 and gpu.available_bytes > 0 else 0
    cap = max(0, gpu.available_bytes // v)
    if not request.multi_replica:
        return min(cap, 1) if gpu.replicas == 0 else 0
    return cap


def _choose(order: Sequence[int], caps: Sequence[int], r: int, k: int) -> list[int]:
    """The policy-best K GPUs (by position in `caps`) that keep the other r-1 replicas feasible.

    `order` lists positions with capacity left, best first. Taking a GPU with caps < r ("low") lowers the
    oracle's sum for the remaining replicas by one, so at most `slack` low GPUs may be taken.

    A choice exists whenever sum(min(c, r)) >= r*k: let h GPUs be high (c >= r) and L the low ones with
    c >= 1. If h >= k take k high ones. Otherwise r*k <= h*r + sum_L c gives sum_L c >= r*(k-h), so
    |L| > k-h (each low c < r) and slack - (k-h) = sum_L c - r*(k-h) >= 0: the h high GPUs and k-h low
    ones fit within the slack. Greedy in policy order therefore always completes.
    """
    rest = r - 1
    slack = sum(min(c, rest) for c in caps) - rest * k
    chosen: list[int] = []
    for pos in order:
        if caps[pos] >= r:
            chosen.append(pos)
        elif slack > 0:
            chosen.append(pos)
            slack -= 1
        else:
            continue
        if len(chosen) == k:
            return chosen
    raise AssertionError("placement invariant broken: the feasibility oracle held but no K-set was found")


def place(request: PlacementRequest, gpus: Sequence[GpuView], *, first_index: int = 0) -> list[ReplicaPlacement]:
    """Place every replica of `request` on `gpus`, or raise DoesNotFit (nothing is reserved here).

    Replica indices run first_index, first_index+1, ...; a scale-up passes one past its highest index.
    """
    validate_request(request, gpus)
    views = sorted(gpus, key=lambda g: g.index)  # deterministic whatever order the ledger uses
    r_total, k = request.replicas, request.gpus_per_replica
    caps = [_capacity(request, g) for g in views]
    if sum(min(c, r_total) for c in caps) < r_total * k:
        reason = refusal_reason(request, views, caps)
        raise DoesNotFit(reason, details={"plan": plan_json(None, reason)})

    v = request.vram_bytes
    counts = [g.replicas for g in views]  # replicas per GPU, growing as this request places its own
    left = [g.available_bytes for g in views]  # memory left after this request's earlier replicas
    key: Callable[[int], tuple[int, ...]]
    if request.policy == "pack":
        def key(pos: int) -> tuple[int, ...]:
            return (left[pos], views[pos].index)
    else:
        def key(pos: int) -> tuple[int, ...]:
            return (counts[pos], -left[pos], views[pos].index)

    placements: list[ReplicaPlacement] = []
    for step in range(r_total):
        order = sorted((pos for pos, c in enumerate(caps) if c > 0), key=key)
        chosen = sorted(_choose(order, caps, r_total - step, k), key=lambda pos: views[pos].index)
        amounts = tuple(views[pos].available_bytes if v is None else v for pos in chosen)
        for pos, amount in zip(chosen, amounts, strict=True):
            caps[pos] -= 1
            counts[pos] += 1
            left[pos] -= amount
        placements.append(
            ReplicaPlacement(
                index=first_index + step,
                gpus=tuple(views[pos].index for pos in chosen),
                vram_bytes=min(amounts),
                vram_by_gpu=amounts,
            )
        )
    return placements


# ---- refusal messages -------------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _room(cap: int, r: int) -> str:
    if r == 1:
        return "room for the replica"
    if cap >= r:
        return "room for both replicas" if r == 2 else f"room for all {r} replicas"
    return f"room for {cap} of the {r} replicas"


def _gpu_detail(request: PlacementRequest, gpu: GpuView, cap: int) -> str:
    """One clause saying what this GPU offers the request, and why not more."""
    name = f"GPU{gpu.index}"
    r, v = request.replicas, request.vram_bytes
    avail = gpu.available_bytes
    has = f"has {format_size(avail)} available" if avail > 0 else "has no memory available"
    if gpu.exclusive:
        return f"{name} is held by an exclusive replica"
    if v is None:
        if gpu.replicas > 0:
            return f"{name} already hosts {_plural(gpu.replicas, 'replica')} (an exclusive GPU must be empty)"
        if avail <= 0:
            return f"{name} {has}"
        return f"{name} is free with {format_size(avail)} available"
    if not request.multi_replica and gpu.replicas > 0:
        return f"{name} already hosts {_plural(gpu.replicas, 'replica')}"
    if cap == 0:
        return f"{name} {has} (needs {format_size(v)})"
    return f"{name} {has}, {_room(cap, r)}"


def refusal_reason(request: PlacementRequest, gpus: Sequence[GpuView], caps: Sequence[int]) -> str:
    """One sentence for a person: what was asked, why it does not fit, then what each GPU offers.

    `gpus` and `caps` are parallel (caps from the same rules `place` uses).
    """
    r, k, v = request.replicas, request.gpus_per_replica, request.vram_bytes
    verb = "does not fit" if r == 1 else "do not fit"
    if v is None:
        each = "an exclusive GPU" if k == 1 else f"{k} exclusive GPUs"
        head = f"{_plural(r, 'replica')} with {each} each {verb}"
    else:
        each = "" if k == 1 else f" on {k} GPUs each"
        head = f"{_plural(r, 'replica')} of {format_size(v)}{each} {verb}"

    allowed = [g for g in gpus if request.gpu_idx is None or g.index in request.gpu_idx]
    excluded = [g.index for g in gpus if request.gpu_idx is not None and g.index not in request.gpu_idx]
    why: list[str] = []
    if not gpus:
        return f"{head}: this machine has no GPUs."
    if k > len(allowed):
        which = "allowed" if request.gpu_idx is not None else "on this machine"
        are = "is" if len(allowed) == 1 else "are"
        why.append(f"each replica needs {k} distinct GPUs and only {len(allowed)} {are} {which}")
    elif k > 1:
        offered = sum(min(c, r) for c in caps)
        why.append(f"each needs {k} distinct GPUs, {r * k} GPU slots in all, and the GPUs offer {offered}")
    if not request.multi_replica and v is not None:
        why.append("single-GPU-multi-replica is off, so a GPU hosts at most one replica")

    details = [
        _gpu_detail(request, g, c)
        for g, c in zip(gpus, caps, strict=True)
        if request.gpu_idx is None or g.index in request.gpu_idx
    ]
    if excluded:
        names = ", ".join(f"GPU{i}" for i in excluded)
        details.append(f"{names} {'is' if len(excluded) == 1 else 'are'} not in gpu_idx")
    intro = head + (f" ({'; '.join(why)})" if why else "")
    return f"{intro}: {'; '.join(details)}."
