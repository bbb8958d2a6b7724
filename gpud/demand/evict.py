"""The eviction planner (SPEC §12): which idle-able models to unload so that a request fits. Pure.

Given the GPUs as they would be without any gpud reservation (`GpuRoom`), the reservations held now, the
request, and the evictable models in least-recently-used order, `plan_eviction` takes the shortest LRU
prefix whose release makes the request fit, spares the models in it whose release does not help (one that
only holds memory on GPUs the request cannot use, say), and returns what is left with the placement it then
gets — or None when even evicting every candidate would not help (then nothing is unloaded: the refusal is
the placement's own).

Why the first fitting prefix is the smallest one: releasing a model's reservations only raises a GPU's
available memory, lowers its replica count and can only clear its exclusive flag, so every GPU's capacity
for the request (gpud.gpus.placement) can only grow. Feasibility is therefore monotone along the prefixes,
and `place` is exact, so scanning prefixes by length finds the shortest one. Sparing then tries each model of
that prefix, the most recently used first, and keeps it loaded when the request still fits without it; by
the same monotonicity the result is minimal: no model of it can be spared (it always holds the prefix's last
model, the one without which the shorter prefix did not fit). All of this is checked against brute force
in tests/demand/test_evict.py.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from gpud.errors import DoesNotFit
from gpud.gpus.ledger import Reservation
from gpud.gpus.placement import GpuView, PlacementRequest, ReplicaPlacement, place


@dataclass(frozen=True)
class GpuRoom:
    """One GPU as placement would see it if gpud held nothing on it."""

    index: int
    total_bytes: int
    free_bytes: int  # total - used by others - headroom (may be <= 0)
    ok: bool = True  # a GPU that is not usable offers nothing


@dataclass(frozen=True)
class EvictionPlan:
    """Unload `evict` (in this order: least recently used first), then place `placements`."""

    evict: tuple[str, ...]
    placements: list[ReplicaPlacement]


def views_without(gpus: Sequence[GpuRoom], holdings: Sequence[Reservation],
                  released: Collection[str] = ()) -> list[GpuView]:
    """What placement sees once the models in `released` hold nothing (the ledger's views when none is)."""
    views = []
    for gpu in gpus:
        holders = [r for r in holdings if gpu.index in r.gpus and r.model not in released]
        available = gpu.free_bytes - sum(r.on(gpu.index) for r in holders)
        views.append(GpuView(
            index=gpu.index,
            total_bytes=gpu.total_bytes,
            available_bytes=max(0, available) if gpu.ok else 0,
            replicas=len(holders),
            exclusive=any(r.exclusive for r in holders),
        ))
    return views


def plan_eviction(request: PlacementRequest, gpus: Sequence[GpuRoom], holdings: Sequence[Reservation],
                  lru: Sequence[str], *, first_index: int = 0) -> EvictionPlan | None:
    """The models to unload (from the shortest fitting prefix of `lru`, those that help) and the placement
    then; None if even unloading every model of `lru` would not let `request` be placed.

    An empty `evict` means the request fits as things are. `lru` names evictable models, least recently used
    first; models not in it are never released. Raises InvalidInput for a malformed request (as `place`).
    """

    def fits(released: Collection[str]) -> list[ReplicaPlacement] | None:
        try:
            return place(request, views_without(gpus, holdings, released), first_index=first_index)
        except DoesNotFit:
            return None

    for count in range(len(lru) + 1):
        placements = fits(lru[:count])
        if placements is None:
            continue
        chosen = list(lru[:count])
        for name in reversed(lru[:count]):  # most recently used first: the one to keep loaded if we can
            rest = [n for n in chosen if n != name]
            spared = fits(rest)
            if spared is not None:
                chosen, placements = rest, spared
        return EvictionPlan(tuple(chosen), placements)
    return None
