"""Who may be evicted, in which order (gpud.demand.room), on registry objects without processes."""

from __future__ import annotations

from gpud.demand.room import evictable_lru, eviction_order, is_free
from gpud.registry import Model, Operation, Replica
from gpud.spec import ModelSpec


def model(name: str, *, last: float, inflight: int = 0, **fields: object) -> Model:
    spec = ModelSpec.from_json({"name": name, "model": name, "engine": "sim", "vram": "1GiB", **fields})
    m = Model(spec, created_at=0.0, last_request_at=last)
    m.replicas[0] = Replica(name, 0, (0,), (2**30,), inflight=inflight)
    return m


def test_only_models_that_may_go_idle_are_ever_evicted_least_recently_used_first() -> None:
    models = [model("pinned", last=1), model("b", last=20, idle_timeout=60), model("a", last=10, on_demand=True),
              model("needer", last=0, on_demand=True)]
    assert [m.name for m in evictable_lru(models, needed_by="needer", now=100)] == ["a", "b"]


def test_in_use_busy_and_just_woken_models_are_not_free_and_in_use_counts_as_used_now() -> None:
    serving = model("serving", last=1, inflight=2, on_demand=True)
    loading = model("loading", last=2, on_demand=True)
    loading.operation = Operation.LOAD
    woken = model("woken", last=5, on_demand=True)
    woken.evict_after = 150  # woken by a request: its waiting requests are on their way
    quiet = model("quiet", last=50, on_demand=True)
    idle = model("idle", last=0, on_demand=True)
    idle.idle, idle.replicas = True, {}
    models = [serving, loading, woken, quiet, idle]
    assert [m.name for m in eviction_order(models, needed_by="x", now=100)] == ["woken", "quiet", "loading",
                                                                                  "serving"]
    assert [m.name for m in evictable_lru(models, needed_by="x", now=100)] == ["quiet"]
    assert not is_free(woken, 100) and is_free(woken, 150)
