"""Simulated GPUs: `sim:ITEM[,ITEM…]` with `ITEM = [Nx]SIZE[@USED]`, for machines without NVIDIA hardware."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from gpud.errors import InvalidInput
from gpud.gpus.base import DeviceReading, GpuProcess
from gpud.units import format_size, parse_size

# A simulated machine larger than any real one is almost certainly a typo (sim:1000x…), and a cap keeps a
# hostile spec from allocating millions of readings.
MAX_SIM_DEVICES = 64

_PREFIX = "sim:"
_FORM = "sim:ITEM[,ITEM…] with ITEM = [Nx]SIZE[@USED], e.g. sim:2x24GiB or sim:80GiB,40GiB@10GiB"
# The count is everything before the first x/X; size units never contain an x, so the split is unambiguous.
_COUNT_RE = re.compile(r"^\s*([^xX]*?)\s*[xX](.*)$")


def sim_uuid(index: int) -> str:
    """A stable, obviously fake UUID in NVML's `GPU-…` shape, so logs and CUDA_VISIBLE_DEVICES look familiar."""
    return f"GPU-sim-{index:04x}-0000-0000-000000000000"


def _size(item: str, text: str, what: str) -> int:
    try:
        return parse_size(text.strip(), what=what)
    except InvalidInput:
        # parse_size's own message quotes only the fragment; the user needs to see which item was wrong.
        raise InvalidInput(
            f"Invalid simulated GPU {item!r}: the {what} {text.strip()!r} is not a size such as 24GiB or 500MB."
        ) from None


def _parse_item(item: str) -> tuple[int, int, int]:
    """(count, size, used) of one ITEM; raises InvalidInput quoting the item."""
    count = 1
    rest = item
    m = _COUNT_RE.match(item)
    if m:
        count_text, rest = m.group(1), m.group(2)
        if not count_text.isdigit() or int(count_text) < 1:
            raise InvalidInput(
                f"Invalid simulated GPU {item!r}: the count {count_text!r} before 'x' must be a whole number of at least 1."
            )
        count = int(count_text)
    size_text, at, used_text = rest.partition("@")
    size = _size(item, size_text, "size")
    if size <= 0:
        raise InvalidInput(f"Invalid simulated GPU {item!r}: the size must be more than 0 bytes.")
    used = 0
    if at:
        used = _size(item, used_text, "used memory")
        if used > size:
            raise InvalidInput(
                f"Invalid simulated GPU {item!r}: the used memory ({format_size(used)}) is more than the size "
                f"({format_size(size)})."
            )
    return count, size, used


def parse_sim_spec(spec: str) -> list[DeviceReading]:
    """Readings for a `sim:` spec (the `sim:` prefix is optional here). Pure; raises InvalidInput."""
    body = spec.strip()
    if body[: len(_PREFIX)].lower() == _PREFIX:
        body = body[len(_PREFIX):]
    if not body.strip():
        raise InvalidInput(f"Invalid GPU spec {spec!r}: name at least one simulated GPU, as in {_FORM}.")
    readings: list[DeviceReading] = []
    for position, raw in enumerate(body.split(","), start=1):
        item = raw.strip()
        if not item:
            raise InvalidInput(f"Invalid GPU spec {spec!r}: item {position} is empty; write {_FORM}.")
        count, size, used = _parse_item(item)
        if len(readings) + count > MAX_SIM_DEVICES:
            raise InvalidInput(
                f"Invalid GPU spec {spec!r}: {item!r} brings the total past {MAX_SIM_DEVICES} simulated GPUs."
            )
        for _ in range(count):
            index = len(readings)
            readings.append(
                DeviceReading(
                    index=index,
                    name=f"Simulated GPU {format_size(size).replace(' ', '')}",
                    uuid=sim_uuid(index),
                    total_bytes=size,
                    used_bytes=used,
                )
            )
    return readings


class SimBackend:
    """Serves fixed readings; tests may change a device's usage or health while a daemon runs."""

    kind = "sim"

    def __init__(self, readings: Sequence[DeviceReading]) -> None:
        self._readings = list(readings)

    def read(self) -> list[DeviceReading]:
        return list(self._readings)

    def close(self) -> None:
        """Nothing to release."""

    def _device(self, index: int) -> DeviceReading:
        if not 0 <= index < len(self._readings):
            raise IndexError(f"there is no simulated GPU {index} (there are {len(self._readings)})")
        return self._readings[index]

    def set_used(self, index: int, used_bytes: int, processes: Sequence[GpuProcess] = ()) -> None:
        """Pretend processes took (or freed) memory on GPU `index`; `used_bytes` counts every process."""
        device = self._device(index)
        if not 0 <= used_bytes <= device.total_bytes:
            raise ValueError(f"used_bytes {used_bytes} is outside 0..{device.total_bytes} for GPU {index}")
        # Replacing the whole list element keeps each read() a consistent snapshot without a lock.
        self._readings[index] = dataclasses.replace(device, used_bytes=used_bytes, processes=tuple(processes))

    def set_ok(self, index: int, ok: bool, reason: str | None = None) -> None:
        """Pretend GPU `index` failed (ok=False, with a reason) or recovered."""
        device = self._device(index)
        self._readings[index] = dataclasses.replace(device, ok=ok, reason=None if ok else (reason or "simulated failure"))
