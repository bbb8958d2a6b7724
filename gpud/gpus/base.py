"""The one GPU reading type every backend produces, and the backend interface the ledger reads through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU, as the driver reports it."""

    pid: int
    used_bytes: int


@dataclass(frozen=True)
class DeviceReading:
    """One GPU at one moment. Readings are immutable: a refresh produces new ones."""

    index: int
    name: str
    uuid: str
    total_bytes: int
    # Memory used on the device as the backend reports it, by every process (gpud's replicas included).
    used_bytes: int
    processes: tuple[GpuProcess, ...] = ()
    # False when the device vanished or the driver failed for it; `reason` then says why in one phrase.
    ok: bool = True
    reason: str | None = None


class GpuBackend(Protocol):
    """Where GPU readings come from: NVML on a real machine, a simulation in tests and demos."""

    kind: str  # "sim" | "nvml"

    def read(self) -> list[DeviceReading]:
        """Current readings, one per device. Cheap and synchronous; a bad device is marked not ok, never raised."""
        ...

    def close(self) -> None:
        """Release the driver handle. Safe to call twice."""
        ...
