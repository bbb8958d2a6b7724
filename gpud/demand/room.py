"""What the eviction planner is given, read from the registry and the ledger (no I/O, no changes).

Evictable (SPEC §12): the model may go idle anyway (on-demand, or an idle timeout), holds memory, has no
request in flight, and nothing is being done to it (no start, scale, load, unload or stop in progress: a
model waking up is never unloaded to wake another). Least recently used first: by its last request, or
by when it was loaded if it has had none since.
"""

from __future__ import annotations

from collections.abc import Iterable

from gpud.demand.evict import GpuRoom
from gpud.gpus.ledger import Ledger
from gpud.registry import Model


def last_used(model: Model) -> float:
    """When the model was last used: its last request, its load, or its creation, whichever is latest."""
    return max(model.last_request_at or 0.0, model.loaded_at or 0.0, model.created_at)


def evictable_lru(models: Iterable[Model], *, needed_by: str) -> list[Model]:
    """The models that may be unloaded to make room for `needed_by`, least recently used first."""
    candidates = [
        m for m in models
        if m.name != needed_by and m.spec.evictable and not m.idle and not m.stopping
        and m.operation is None and m.replicas and m.inflight() == 0
    ]
    return sorted(candidates, key=lambda m: (last_used(m), m.name))


def gpu_rooms(ledger: Ledger) -> list[GpuRoom]:
    """Every GPU as it would be without gpud's reservations (the ledger's current readings)."""
    return [GpuRoom(d.index, d.total_bytes, ledger.free_bytes(d.index), d.ok) for d in ledger.devices()]
