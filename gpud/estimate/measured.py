"""Measured against reserved: what a replica's processes really use on its GPUs, beside its reservation.

On NVML the driver lists each process's memory per GPU; a replica's figure is the sum over the pids of
its process tree (the supervisor records them in the ledger's OwnedPids). `model show` carries it per
replica and `gpud gpus` per GPU; the daemon logs one warning when a replica uses more than it reserved,
the sign of an estimate (or a --vram) that is too small. On the sim backend nothing is measured (null).
"""

from __future__ import annotations

import logging
from typing import Any

from gpud.gpus.ledger import Ledger
from gpud.units import format_size

log = logging.getLogger(__name__)


def with_measured(show: dict[str, Any], ledger: Ledger) -> dict[str, Any]:
    """A `model show` object with each replica's `measured_bytes` (the most it uses on any one of its GPUs,
    to compare with the per-GPU `vram_bytes`) and `measured_by_gpu` (following `gpus`); null when unknown."""
    for replica in show.get("replicas") or []:
        measured = ledger.measured(show["name"], replica["index"])
        by_gpu = None if measured is None else [measured.get(g, 0) for g in replica["gpus"]]
        replica["measured_bytes"] = max(by_gpu) if by_gpu else None
        replica["measured_by_gpu"] = by_gpu
    return show


class OveruseWatch:
    """Warns once per replica that uses more GPU memory than it reserved (checked at every ledger refresh).

    A replica is warned about again only after its reservation ended (it was stopped or failed for good)
    and a new one began: a restart keeps the reservation, and the warning would say the same again."""

    def __init__(self) -> None:
        self._warned: set[tuple[str, int]] = set()

    def check(self, ledger: Ledger) -> list[str]:
        """Log (and return) a warning for each replica newly found over its reservation."""
        current = {(r.model, r.replica): r for r in ledger.reservations()}
        self._warned &= set(current)
        messages: list[str] = []
        for key, reservation in current.items():
            if key in self._warned:
                continue
            measured = ledger.measured(*key)
            if not measured:
                continue
            over = [(g, measured[g], reservation.on(g)) for g in reservation.gpus if measured[g] > reservation.on(g)]
            if not over:
                continue
            self._warned.add(key)
            detail = "; ".join(f"GPU {g}: uses {format_size(used)} of {format_size(held)} reserved"
                               for g, used, held in over)
            message = (f"model {key[0]!r} replica {key[1]} uses more GPU memory than it reserved ({detail}); "
                       "other replicas on its GPUs may run out of memory: give it a larger --vram "
                       "(or more --context-tokens headroom in the estimate)")
            log.warning("%s", message)
            messages.append(message)
        return messages
