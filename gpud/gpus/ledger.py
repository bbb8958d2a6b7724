"""GPU ledger: backend readings + gpud's reservations → memory available per GPU (SPEC §4).

available(GPU) = total − used by processes gpud does not own − Σ gpud reservations − headroom

gpud's own replica processes show up in the driver's `used` figure, yet their memory is already counted
by their reservation; the ledger subtracts what those processes (their pids come from `owned_pids`) use so
it is not counted twice. Pure state and arithmetic: the backend is injected, nothing here does I/O itself.

The service is the one owner of reservations: it reserves what placement chose and releases a replica's
reservation once its processes are gone (the supervisor tells it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gpud.errors import Conflict, DoesNotFit, NotFound
from gpud.gpus.base import DeviceReading, GpuBackend
from gpud.gpus.placement import GpuView, plan_json
from gpud.units import format_size


class OwnedPids:
    """The processes of gpud's replicas, by replica: the supervisor fills it as it sees their trees, the
    ledger reads it (the memory those processes use is counted by their reservations already)."""

    def __init__(self) -> None:
        self._by_replica: dict[tuple[str, int], frozenset[int]] = {}

    def set(self, model: str, index: int, pids: Iterable[int]) -> None:
        self._by_replica[(model, index)] = frozenset(pids)

    def discard(self, model: str, index: int) -> None:
        self._by_replica.pop((model, index), None)

    def all(self) -> frozenset[int]:
        return frozenset().union(*self._by_replica.values())

    def of(self, model: str, index: int) -> frozenset[int]:
        """The pids of one replica's process tree (empty when it has none)."""
        return self._by_replica.get((model, index), frozenset())


@dataclass(frozen=True)
class Reservation:
    """Memory one replica holds: `vram_by_gpu[i]` bytes on GPU `gpus[i]`."""

    model: str
    replica: int
    gpus: tuple[int, ...]
    vram_by_gpu: tuple[int, ...]
    exclusive: bool = False  # no other replica may share these GPUs

    def __post_init__(self) -> None:
        # A malformed reservation is a bug in the caller, not a user error: fail loudly.
        if len(self.gpus) != len(self.vram_by_gpu):
            raise ValueError(f"reservation {self.model}/{self.replica}: gpus and vram_by_gpu differ in length")
        if len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"reservation {self.model}/{self.replica}: a GPU is listed twice")
        if any(v < 0 for v in self.vram_by_gpu):
            raise ValueError(f"reservation {self.model}/{self.replica}: negative memory")

    def on(self, index: int) -> int:
        """Bytes this reservation holds on GPU `index` (0 if it does not use it)."""
        return sum(v for g, v in zip(self.gpus, self.vram_by_gpu, strict=True) if g == index)


def _replica_name(r: Reservation) -> str:
    return f"model {r.model!r} replica {r.replica}"


class Ledger:
    """The single record of which replica holds how much memory on which GPU."""

    def __init__(
        self,
        backend: GpuBackend,
        *,
        headroom_bytes: int,
        owned: OwnedPids | None = None,
    ) -> None:
        if headroom_bytes < 0:
            raise ValueError("headroom_bytes cannot be negative")
        self._backend = backend
        self._headroom = headroom_bytes
        self._owned_pids = owned or OwnedPids()
        # Insertion order is kept so listings follow the order replicas were placed.
        self._reservations: dict[tuple[str, int], Reservation] = {}
        self._devices: dict[int, DeviceReading] = {}
        self._owned: frozenset[int] = frozenset()
        self.refresh()

    @property
    def headroom_bytes(self) -> int:
        return self._headroom

    def refresh(self) -> None:
        """Re-read the backend. Cheap; call it periodically and before placing."""
        readings = self._backend.read()
        # Owned pids are taken after the reading: a replica process seen in the reading is then surely in
        # the set (unless it already exited, and then its memory is gone too). The other order could count
        # a just-started replica's memory twice.
        owned = self._owned_pids.all()
        self._devices = {d.index: d for d in sorted(readings, key=lambda d: d.index)}
        self._owned = owned

    def devices(self) -> list[DeviceReading]:
        return list(self._devices.values())

    def _device(self, index: int) -> DeviceReading:
        try:
            return self._devices[index]
        except KeyError:
            raise NotFound(f"GPU {index} does not exist (this machine has GPUs {self._index_list()}).") from None

    def _index_list(self) -> str:
        return ", ".join(str(i) for i in self._devices) or "none"

    def used_by_others(self, index: int) -> int:
        """Memory on GPU `index` used by processes that are not gpud replicas."""
        device = self._device(index)
        ours = sum(p.used_bytes for p in device.processes if p.pid in self._owned)
        return max(0, device.used_bytes - ours)

    def measured(self, model: str, replica: int) -> dict[int, int] | None:
        """What the processes of one replica use on each GPU of its reservation, as the driver last reported
        it (GPU index → bytes). None when that cannot be known: on the sim backend (its readings list no
        processes), or when the replica holds no reservation or has no process yet."""
        pids = self._owned_pids.of(model, replica)
        reservation = self._reservations.get((model, replica))
        if self._backend.kind == "sim" or not pids or reservation is None:
            return None
        return {
            index: sum(p.used_bytes for p in self._devices[index].processes if p.pid in pids)
            if index in self._devices else 0
            for index in reservation.gpus
        }

    def reserved(self, index: int) -> int:
        """Σ gpud reservations on GPU `index`."""
        return sum(r.on(index) for r in self._reservations.values())

    def available(self, index: int) -> int:
        """total − used by others − reserved − headroom; may be negative (overcommitted). 0 for a GPU not ok."""
        device = self._device(index)
        if not device.ok:
            return 0
        return device.total_bytes - self.used_by_others(index) - self.reserved(index) - self._headroom

    def _holders(self, index: int) -> list[Reservation]:
        return [r for r in self._reservations.values() if index in r.gpus]

    def views(self) -> list[GpuView]:
        """What placement sees: one view per GPU; a GPU that is not ok offers nothing."""
        views = []
        for index, device in self._devices.items():
            holders = self._holders(index)
            views.append(
                GpuView(
                    index=index,
                    total_bytes=device.total_bytes,
                    available_bytes=max(0, self.available(index)) if device.ok else 0,
                    replicas=len(holders),
                    exclusive=any(r.exclusive for r in holders),
                )
            )
        return views

    def reserve(self, reservations: Sequence[Reservation], *, replacing: Iterable[str] = ()) -> None:
        """Record every reservation, or none: Conflict for a replica already holding one, DoesNotFit otherwise.

        `replacing` names models being unloaded to make room (SPEC §12 eviction): the batch is checked as if
        they held nothing, yet they keep their reservations until their processes are gone, so for a while
        the GPU is reserved twice over and nobody else can place there. Their room passes to this batch
        whole, and the batch's replicas must not start before those processes are gone.
        """
        batch = list(reservations)
        retiring = set(replacing)
        seen: set[tuple[str, int]] = set()
        for r in batch:
            key = (r.model, r.replica)
            if key in self._reservations or key in seen:
                raise Conflict(f"The {_replica_name(r)} already holds a GPU reservation.")
            seen.add(key)
        problems: list[str] = []
        gpus: list[dict[str, Any]] = []
        touched = sorted({g for r in batch for g in r.gpus})
        for index in touched:
            device = self._devices.get(index)
            wanting = [r for r in batch if index in r.gpus]
            if device is None:
                problems.append(f"GPU {index} does not exist")
                continue
            if not device.ok:
                problems.append(f"GPU {index} is not usable ({device.reason or 'unknown reason'})")
                continue
            # Exclusivity is the placement's rule, but the ledger is the last line of defence before a
            # process is started on a GPU someone else was promised.
            holders = [r for r in self._holders(index) if r.model not in retiring]
            sharing = holders + wanting
            if len(sharing) > 1 and any(r.exclusive for r in sharing):
                owner = next(r for r in sharing if r.exclusive)
                problems.append(f"GPU {index} would be shared although the {_replica_name(owner)} needs it exclusively")
                continue
            needed = sum(r.on(index) for r in wanting)
            available = self.available(index) + sum(
                r.on(index) for r in self._reservations.values() if r.model in retiring
            )
            gpus.append({"index": index, "needed_bytes": needed, "available_bytes": max(0, available)})
            if needed > 0 and needed > available:
                problems.append(
                    f"GPU {index} needs {format_size(needed)} but has {format_size(max(0, available))} available"
                )
        if problems:
            reason = "Cannot reserve the GPU memory: " + "; ".join(problems) + "."
            raise DoesNotFit(reason, details={"plan": plan_json(None, reason), "gpus": gpus})
        for r in batch:
            self._reservations[(r.model, r.replica)] = r

    def holds(self, model: str, replica: int) -> bool:
        """Whether one replica of `model` has its reservation."""
        return (model, replica) in self._reservations

    def release(self, model: str, replica: int) -> None:
        """Forget one replica's reservation; nothing happens if it holds none."""
        self._reservations.pop((model, replica), None)

    def reserved_replicas(self, model: str) -> list[int]:
        """The replica indices of `model` that hold a reservation."""
        return sorted(replica for name, replica in self._reservations if name == model)

    def release_model(self, model: str) -> None:
        """Forget every reservation of `model`."""
        for key in [k for k in self._reservations if k[0] == model]:
            del self._reservations[key]

    def free_bytes(self, index: int) -> int:
        """What GPU `index` would offer with no gpud reservation: total − used by others − headroom."""
        return self.available(index) + self.reserved(index)

    def reservations(self, model: str | None = None) -> list[Reservation]:
        return [r for r in self._reservations.values() if model is None or r.model == model]

    def to_json(self) -> dict[str, Any]:
        """The `gpus` listing of the control API."""
        gpus = []
        for index, device in self._devices.items():
            gpus.append(
                {
                    "index": index,
                    "name": device.name,
                    "uuid": device.uuid,
                    "total_bytes": device.total_bytes,
                    "used_by_others_bytes": self.used_by_others(index),
                    "reserved_bytes": self.reserved(index),
                    "available_bytes": max(0, self.available(index)),
                    "replicas": [self._holder_json(r, index) for r in self._holders(index)],
                    "ok": device.ok,
                    "reason": device.reason,
                }
            )
        return {"gpus": gpus}

    def _holder_json(self, r: Reservation, index: int) -> dict[str, Any]:
        measured = self.measured(r.model, r.replica)
        return {"model": r.model, "index": r.replica, "reserved_bytes": r.on(index),
                "measured_bytes": None if measured is None else measured.get(index)}
