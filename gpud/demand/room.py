"""What the eviction planner is given, read from the registry and the ledger (no I/O, no changes).

Evictable (SPEC §12): the model may go idle anyway (on-demand, or an idle timeout) and holds memory. It may
be evicted *now* when it is free: no request in flight, nothing being done to it (no start, scale, load,
unload or stop in progress: a model waking up is never unloaded to wake another), and not woken by a request
less than WAKE_GRACE_SEC ago — between a wake's end and the moment the requests that waited for it are
counted in flight it would look unused (with proxy workers the counts reach the registry a little later
still).

Least recently used first: by its last request, or by when it was loaded if it has had none since; a model
in use or busy counts as used now (a model just woken keeps its time: its last request is that of the
requests that woke it). A start, scale or load evicts only free models. A wake plans over every
evictable model in that order and, when the models it must unload are not free yet, waits for them rather
than unload another that happens to be free at that instant but was used more recently.
"""

from __future__ import annotations

from collections.abc import Iterable

from gpud.demand.evict import GpuRoom
from gpud.gpus.ledger import Ledger
from gpud.registry import Model

WAKE_GRACE_SEC = 2.0


def last_used(model: Model) -> float:
    """When the model was last used: its last request, its load, or its creation, whichever is latest."""
    return max(model.last_request_at or 0.0, model.loaded_at or 0.0, model.created_at)


def is_free(model: Model, now: float) -> bool:
    """Whether an evictable model may be unloaded at `now` (see the module docstring)."""
    return model.operation is None and model.inflight() == 0 and now >= model.evict_after


def eviction_order(models: Iterable[Model], *, needed_by: str, now: float) -> list[Model]:
    """Every evictable model but `needed_by`, least recently used first (in use or busy: used now)."""
    candidates = [m for m in models
                  if m.name != needed_by and m.spec.evictable and not m.idle and not m.stopping and m.replicas]
    in_use = {m.name for m in candidates if m.operation is not None or m.inflight() > 0}
    return sorted(candidates, key=lambda m: (now if m.name in in_use else last_used(m), m.name))


def evictable_lru(models: Iterable[Model], *, needed_by: str, now: float) -> list[Model]:
    """The models that may be unloaded now to make room for `needed_by`, least recently used first."""
    return [m for m in eviction_order(models, needed_by=needed_by, now=now) if is_free(m, now)]


def gpu_rooms(ledger: Ledger) -> list[GpuRoom]:
    """Every GPU as it would be without gpud's reservations (the ledger's current readings)."""
    return [GpuRoom(d.index, d.total_bytes, ledger.free_bytes(d.index), d.ok) for d in ledger.devices()]
