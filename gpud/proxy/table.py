"""The proxy's routing table: what a proxy worker knows about the models, as the daemon pushes it (SPEC §14).

The daemon's registry stays the one source of truth; the table is a snapshot of the part the data plane
needs (each model's state and replicas with their ports and counter slots, plus what /metrics reports),
built by `build_table` whenever the registry changes and sent to every worker as JSON. Workers never decide
a replica's life: they only route by the latest table they were given.

`Slots` is the daemon's side of the shared counters (gpud.proxy.counters): which slot each model and each
replica counts in. A replica keeps its slot for as long as its (model, index) exists; a freed slot is
handed out again only once no worker counts a request in it.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpud.proxy.counters import Counters
from gpud.registry import Operation, Registry, ReplicaState
from gpud.spec import DEFAULT_ROUTING

log = logging.getLogger(__name__)
READY = ReplicaState.READY.value


@dataclass(frozen=True)
class ReplicaRoute:
    index: int
    port: int
    slot: int  # counter slot of its in-flight requests
    state: str  # ReplicaState value
    restarts: int = 0

    @property
    def ready(self) -> bool:
        return self.state == READY


@dataclass(frozen=True)
class ModelRoute:
    name: str
    slot: int  # counter slot of its last-request time and tie-break cursor
    state: str  # ModelState value
    created: float
    replicas: tuple[ReplicaRoute, ...] = ()
    routing: str = DEFAULT_ROUTING
    # SPEC §12: a request that finds no ready replica waits for the model's wake (it is idle, loading or
    # going idle) instead of getting 503.
    waits: bool = False
    # The replicas in the balancer, in index order (a tuple built once per table, not per request).
    ready: tuple[ReplicaRoute, ...] = field(default=(), compare=False)

    @classmethod
    def of(cls, name: str, slot: int, state: str, created: float, replicas: Iterable[ReplicaRoute],
           routing: str = DEFAULT_ROUTING, waits: bool = False) -> ModelRoute:
        ordered = tuple(sorted(replicas, key=lambda r: r.index))
        return cls(name, slot, state, created, ordered, routing, waits, tuple(r for r in ordered if r.ready))


@dataclass(frozen=True)
class RouteTable:
    version: int = 0
    models: Mapping[str, ModelRoute] = field(default_factory=dict)
    gpus: tuple[Mapping[str, Any], ...] = ()  # the ledger's rows, for /metrics

    def to_json(self) -> bytes:
        return json.dumps(self.to_obj(), separators=(",", ":")).encode()

    def to_obj(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "models": [
                {"name": m.name, "slot": m.slot, "state": m.state, "created": m.created, "routing": m.routing,
                 "waits": m.waits, "replicas": [[r.index, r.port, r.slot, r.state, r.restarts] for r in m.replicas]}
                for m in self.models.values()
            ],
            "gpus": list(self.gpus),
        }

    @classmethod
    def from_json(cls, raw: bytes | str) -> RouteTable:
        return cls.from_obj(json.loads(raw))

    @classmethod
    def from_obj(cls, data: Mapping[str, Any]) -> RouteTable:
        models = {
            m["name"]: ModelRoute.of(m["name"], m["slot"], m["state"], m["created"],
                                     (ReplicaRoute(*r) for r in m["replicas"]), m.get("routing", DEFAULT_ROUTING),
                                     m.get("waits", False))
            for m in data["models"]
        }
        return cls(data["version"], models, tuple(data.get("gpus", ())))


class Slots:
    """Counter slots of models and replicas, handed out by the daemon."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self._models: dict[str, int] = {}
        self._replicas: dict[tuple[str, int], int] = {}
        # Oldest freed first: a request that outlives its model (a drain timeout, a worker on an older table)
        # counts into a slot that no new model takes for the next model_slots - 1 starts.
        self._free_models = collections.deque(range(counters.model_slots))
        self._free_replicas = list(range(counters.replica_slots - 1, -1, -1))
        self._draining: list[int] = []  # freed replica slots that some worker still counts in

    def model(self, name: str) -> int:
        slot = self._models.get(name)
        if slot is None:
            if not self._free_models:
                raise RuntimeError("no free model slot in the proxy counters")
            slot = self._models[name] = self._free_models.popleft()
            self.counters.reset_model(slot)
        return slot

    def replica(self, name: str, index: int) -> int:
        slot = self._replicas.get((name, index))
        if slot is None:
            self._reclaim()
            if not self._free_replicas:
                raise RuntimeError("no free replica slot in the proxy counters")
            slot = self._replicas[(name, index)] = self._free_replicas.pop()
        return slot

    def keep_only(self, models: set[str], replicas: set[tuple[str, int]]) -> None:
        """Free the slots of models and replicas that no longer exist."""
        for name in [n for n in self._models if n not in models]:
            self._free_models.append(self._models.pop(name))
        for key in [k for k in self._replicas if k not in replicas]:
            self._draining.append(self._replicas.pop(key))

    def _reclaim(self) -> None:
        still: list[int] = []
        for slot in self._draining:
            (self._free_replicas if self.counters.inflight(slot) == 0 else still).append(slot)
        self._draining = still

    def replica_slots(self) -> Mapping[tuple[str, int], int]:
        return self._replicas

    def model_slots(self) -> Mapping[str, int]:
        return self._models


class Feed:
    """The daemon's side of the table: built from the registry, and what the workers count copied back."""

    def __init__(self, registry: Registry, counters: Counters,
                 gpus: Callable[[], Iterable[Mapping[str, Any]]] = tuple) -> None:
        self.registry = registry
        self.counters = counters
        self.slots = Slots(counters)
        self._gpus = gpus
        self._version = 0

    def table(self) -> RouteTable:
        """The table for the registry as it is now; gives slots to new models and replicas, frees old ones."""
        slots = self.slots
        models: dict[str, ModelRoute] = {}
        live: set[tuple[str, int]] = set()
        for model in self.registry:
            replicas = []
            for replica in model.replicas.values():
                if not replica.port:
                    continue  # not started yet: nothing to route to, nothing to count
                live.add((model.name, replica.index))
                replicas.append(ReplicaRoute(replica.index, replica.port, slots.replica(model.name, replica.index),
                                             replica.state.value, replica.restarts))
            waits = model.idle or model.operation in (Operation.LOAD, Operation.UNLOAD)
            models[model.name] = ModelRoute.of(model.name, slots.model(model.name), model.served_state(),
                                               model.created_at, replicas, model.spec.routing, waits)
        slots.keep_only(set(models), live)
        self._version += 1
        try:
            gpus = tuple(self._gpus())
        except Exception:  # a bad reading must not stop the routing table: /metrics just lacks the ledger
            log.exception("Could not read the GPU ledger for the proxy's /metrics.")
            gpus = ()
        return RouteTable(self._version, models, gpus)

    def applied(self, table: RouteTable) -> None:
        """Every proxy worker routes by `table` now (or a later one): a replica that is not ready in it gets no
        new request any more, so its drain may trust its in-flight count."""
        ready = {(m.name, r.index) for m in table.models.values() for r in m.ready}
        for model in self.registry:
            for replica in model.replicas.values():
                replica.routed = (model.name, replica.index) in ready
        self.copy_counts()

    def copy_counts(self) -> None:
        """Each replica's in-flight requests and each model's last request time, from the shared counters
        into the registry (where the drain, `model show` and the demand logic read them)."""
        counters = self.counters
        replica_slots, model_slots = self.slots.replica_slots(), self.slots.model_slots()
        for model in self.registry:
            slot = model_slots.get(model.name)
            if slot is not None:
                model.last_request_at = counters.last_request(slot) or None
            for replica in model.replicas.values():
                rslot = replica_slots.get((model.name, replica.index))
                replica.inflight = counters.inflight(rslot) if rslot is not None else 0
