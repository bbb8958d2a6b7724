"""Real GPUs through NVML (the `pynvml` module of nvidia-ml-py), imported lazily so gpud runs without it."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from gpud.errors import GpudError
from gpud.gpus.base import DeviceReading, GpuProcess

MIG_REASON = "MIG mode is enabled; gpud does not place on MIG devices yet"
SIM_HINT = "start the daemon with --gpus sim:2x24GiB to simulate GPUs instead"

# NVML return codes (stable across driver versions); named here so the fake pynvml in tests needs no table.
_NOT_SUPPORTED = 3
_FUNCTION_NOT_FOUND = 13
_MIG_ENABLED = 1


def _text(value: bytes | str) -> str:
    """Old nvidia-ml-py releases return bytes for names and UUIDs, newer ones str."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


class NvmlBackend:
    """Reads every NVIDIA GPU of the machine. NVML is initialised once, here, and shut down by close()."""

    kind = "nvml"

    def __init__(self) -> None:
        try:
            self._nvml: Any = importlib.import_module("pynvml")
        except ImportError as err:
            raise GpudError(
                f"The NVML Python module (pynvml, from nvidia-ml-py) cannot be imported ({err}); "
                f"install nvidia-ml-py or {SIM_HINT}."
            ) from None
        try:
            self._nvml.nvmlInit()
        except Exception as err:  # NVMLError, or OSError from a broken libnvidia-ml: all mean "no NVML"
            raise GpudError(
                f"NVML could not be initialised ({err}), so gpud cannot see the GPUs (is the NVIDIA driver "
                f"installed and loaded?); {SIM_HINT}."
            ) from None
        self._closed = False
        try:
            count = int(self._nvml.nvmlDeviceGetCount())
        except Exception as err:
            self.close()
            raise GpudError(f"NVML could not count the GPUs ({err}); {SIM_HINT}.") from None
        if count == 0:
            self.close()
            raise GpudError(f"NVML reports no NVIDIA GPU on this machine; {SIM_HINT}.")
        # Last good reading per index: a device that later fails keeps its name, UUID and size in the output.
        self._last: dict[int, DeviceReading] = {}
        self._count = count

    def read(self) -> list[DeviceReading]:
        if self._closed:
            return self._all_failed("the NVML backend is closed")
        try:
            count = int(self._nvml.nvmlDeviceGetCount())
        except Exception as err:
            return self._all_failed(f"NVML stopped answering: {err}")
        readings = [self._read_one(index) for index in range(count)]
        # A GPU that fell off the bus disappears from the count; keep reporting it so its reservations stay
        # visible and nothing is placed on it.
        for index in range(count, max(self._count, max(self._last, default=-1) + 1)):
            readings.append(self._failed(index, "the device is no longer reported by NVML"))
        self._count = max(self._count, count)
        return readings

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # shutting down a driver that is already gone has nothing left to release
            pass

    def _read_one(self, index: int) -> DeviceReading:
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            # Checked before the process lists: a MIG parent may refuse to list processes, and the MIG reason
            # is the one a user can act on.
            mig = self._mig_enabled(handle)
            reading = DeviceReading(
                index=index,
                name=_text(nvml.nvmlDeviceGetName(handle)),
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                total_bytes=int(memory.total),
                used_bytes=int(memory.used),
                processes=() if mig else self._processes(handle),
                ok=not mig,
                reason=MIG_REASON if mig else None,
            )
        except Exception as err:
            # One bad device must never take the whole reading (and with it the daemon) down.
            return self._failed(index, self._describe(err))
        self._last[index] = reading
        return reading

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        """Compute and graphics processes merged by pid (a process with both contexts is listed twice)."""
        by_pid: dict[int, int] = {}
        for query in (self._nvml.nvmlDeviceGetComputeRunningProcesses,
                      self._nvml.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                listed = query(handle)
            except Exception as err:
                # Some boards and vGPU setups cannot list processes; the device is still usable, only the
                # attribution of its used memory to gpud's replicas is lost (counted as used by others).
                if getattr(err, "value", None) in (_NOT_SUPPORTED, _FUNCTION_NOT_FOUND):
                    continue
                raise
            for proc in listed:
                used = int(proc.usedGpuMemory or 0)  # None: the driver cannot tell (e.g. no permission)
                by_pid[int(proc.pid)] = max(by_pid.get(int(proc.pid), 0), used)
        return tuple(GpuProcess(pid=pid, used_bytes=used) for pid, used in sorted(by_pid.items()))

    def _mig_enabled(self, handle: Any) -> bool:
        get_mig_mode = getattr(self._nvml, "nvmlDeviceGetMigMode", None)
        if get_mig_mode is None:  # nvidia-ml-py older than MIG itself
            return False
        try:
            current, _pending = get_mig_mode(handle)
        except Exception as err:
            # GPUs without MIG support answer NOT_SUPPORTED; that just means "not MIG".
            if getattr(err, "value", None) in (_NOT_SUPPORTED, _FUNCTION_NOT_FOUND):
                return False
            raise
        return int(current) == _MIG_ENABLED

    def _describe(self, err: Exception) -> str:
        if isinstance(err, getattr(self._nvml, "NVMLError", ())):
            return f"NVML error: {err}"
        return f"{type(err).__name__}: {err}"

    def _failed(self, index: int, reason: str) -> DeviceReading:
        last = self._last.get(index)
        if last is None:
            return DeviceReading(index=index, name="unknown", uuid="", total_bytes=0, used_bytes=0, ok=False,
                                 reason=reason)
        # Keep the last good reading (identity, size, usage as last seen) so the ledger's numbers stay coherent.
        return dataclasses.replace(last, ok=False, reason=reason)

    def _all_failed(self, reason: str) -> list[DeviceReading]:
        top = max(self._count, max(self._last, default=-1) + 1)
        return [self._failed(index, reason) for index in range(top)]
