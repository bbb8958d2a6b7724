"""GPU backends: `auto` reads NVIDIA GPUs through NVML, `sim:…` simulates them (SPEC §3)."""

from __future__ import annotations

from gpud.errors import InvalidInput
from gpud.gpus.base import DeviceReading, GpuBackend, GpuProcess
from gpud.gpus.sim import SimBackend, parse_sim_spec

__all__ = ["DeviceReading", "GpuBackend", "GpuProcess", "SimBackend", "open_backend", "parse_sim_spec"]


def open_backend(spec: str) -> GpuBackend:
    """The backend a `--gpus` spec names. InvalidInput for a bad spec; GpudError (exit 1) when NVML is missing."""
    text = spec.strip()
    if text.lower() == "auto":
        # Imported here so that `sim:` daemons and the CLI never touch the NVML module.
        from gpud.gpus.nvml import NvmlBackend

        return NvmlBackend()
    if text[:4].lower() == "sim:":
        return SimBackend(parse_sim_spec(text))
    raise InvalidInput(
        f"Invalid GPU spec {spec!r}: use auto (the NVIDIA GPUs, read through NVML) or "
        "sim:ITEM[,ITEM…] with ITEM = [Nx]SIZE[@USED], e.g. sim:2x24GiB."
    )
