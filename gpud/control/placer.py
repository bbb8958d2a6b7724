"""The GPU side of the model operations: where new replicas go, which models to evict to make room for
them, and the reservations, which are taken and released here only (ModelService decides when).

Eviction (SPEC §12): when a request does not fit as things are, the pure planner (gpud.demand.evict)
names the idle-able models whose unloading would make it fit, least recently used first, or none helps
and the §4 refusal stands with nothing changed. A reservation that evicts is taken *in place of* the
victims' (`reserve(..., evicting=…)`): the ledger counts both until their processes are gone, so nobody
else can take the room meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from gpud.config import Settings
from gpud.demand.evict import plan_eviction, views_without
from gpud.demand.room import evictable_lru, eviction_order, gpu_rooms, is_free
from gpud.errors import DoesNotFit
from gpud.gpus.ledger import Ledger, Reservation
from gpud.gpus.placement import ReplicaPlacement, place, plan_json
from gpud.registry import Model, Registry
from gpud.spec import ModelSpec

# How often a wake that waits for room (SPEC §12: the models that could make room are in use) tries again.
ROOM_POLL_SEC = 0.05


class RoomComing(DoesNotFit):
    """A wake would fit once the models it must evict are free (no request in flight, nothing in progress)."""


class Placer:
    """Placement and reservations over one ledger; see the module docstring."""

    def __init__(self, settings: Settings, registry: Registry, ledger: Ledger) -> None:
        self.settings = settings
        self.registry = registry
        self.ledger = ledger

    def place(self, spec: ModelSpec, replicas: int, first_index: int) -> list[ReplicaPlacement]:
        """Where `replicas` new replicas of `spec` go as things are (the §4 DoesNotFit when they do not fit)."""
        self.ledger.refresh()
        request = spec.placement_request(replicas, self.settings.multi_replica)
        return place(request, self.ledger.views(), first_index=first_index)

    def make_room(self, spec: ModelSpec, replicas: int, first_index: int, *,
                  waiting: bool = False) -> tuple[list[ReplicaPlacement], list[Model]]:
        """Where `replicas` new replicas of `spec` go, and the models to evict first (none when they fit as
        things are). Raises the §4 DoesNotFit, with nothing changed, when no eviction would help; with
        `waiting` (a wake), RoomComing when the models to evict are in use or busy for now."""
        self.ledger.refresh()
        request = spec.placement_request(replicas, self.settings.multi_replica)
        try:
            return place(request, self.ledger.views(), first_index=first_index), []
        except DoesNotFit as refusal:
            now = time.time()
            order = (eviction_order if waiting else evictable_lru)(self.registry, needed_by=spec.name, now=now)
            plan = plan_eviction(request, gpu_rooms(self.ledger), self.ledger.reservations(),
                                 [m.name for m in order], first_index=first_index)
            if plan is None:
                raise
            victims = [self.registry.models[name] for name in plan.evict]
            if not all(is_free(v, now) for v in victims):
                raise RoomComing(refusal.message, details=refusal.details) from None
            return plan.placements, victims

    def check_could_fit(self, spec: ModelSpec) -> None:
        """An on-demand model that could not be placed even on GPUs gpud holds nothing on is refused now."""
        self.ledger.refresh()
        request = spec.placement_request(spec.replicas, self.settings.multi_replica)
        try:
            place(request, views_without(gpu_rooms(self.ledger), [], ()))
        except DoesNotFit as exc:
            reason = f"{exc.message[:-1]}, even with no other model loaded."
            raise DoesNotFit(reason, details={"plan": plan_json(None, reason)}) from None

    def reserve(self, spec: ModelSpec, placements: list[ReplicaPlacement], evicting: Sequence[Model] = ()) -> None:
        """Reserve what placement chose, all or nothing (in place of the models being evicted for it)."""
        self.ledger.reserve([
            Reservation(spec.name, p.index, p.gpus, p.vram_by_gpu, exclusive=spec.vram_bytes is None)
            for p in placements
        ], replacing=[m.name for m in evicting])

    def holds(self, model: str, index: int) -> bool:
        """Whether replica `index` of `model` still has its reservation (one that ended for good has none)."""
        return self.ledger.holds(model, index)

    def release_all_but(self, model: str, keep: Iterable[int]) -> list[int]:
        """Free the reservations of `model`'s replicas that are not in `keep` (what an operation that failed
        half-way reserved for replicas it never added); returns their indices."""
        kept = set(keep)
        extra = [index for index in self.ledger.reserved_replicas(model) if index not in kept]
        self.release(model, extra)
        return extra

    def release(self, model: str, indices: list[int] | None = None) -> None:
        """Free the memory of these replicas of `model` (every one when `indices` is None)."""
        if indices is None:
            self.ledger.release_model(model)
        for index in indices or ():
            self.ledger.release(model, index)
