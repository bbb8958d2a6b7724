"""A fake `pynvml` module: configurable devices, processes, errors, MIG mode, init failure.

Install it with `install(monkeypatch)`, which puts it into sys.modules["pynvml"] for one test. It mimics
the nvidia-ml-py calls gpud makes, including NVMLError carrying an NVML return code in `.value`.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1

_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """Like pynvml.NVMLError: the NVML return code in `.value`, its text as str()."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _STRINGS.get(self.value, f"NVML Error with code {self.value}")


@dataclass
class FakeProcess:
    """Shaped like pynvml's c_nvmlProcessInfo_t: usedGpuMemory is None when the driver cannot tell."""

    pid: int
    usedGpuMemory: int | None  # pynvml's field name


@dataclass
class FakeMemory:
    total: int
    used: int
    free: int


@dataclass
class FakeDevice:
    name: str | bytes = "NVIDIA H100 80GB HBM3"
    uuid: str | bytes = "GPU-00000000-0000-0000-0000-000000000000"
    total: int = 80 * 2**30
    used: int = 0
    compute: list[FakeProcess] = field(default_factory=list)
    graphics: list[FakeProcess] = field(default_factory=list)
    mig_mode: int = NVML_DEVICE_MIG_DISABLE
    # NVML function name (e.g. "nvmlDeviceGetMemoryInfo") -> return code it fails with for this device.
    errors: dict[str, int] = field(default_factory=dict)


class FakePynvml(types.ModuleType):
    """The module object. Mutate `devices`, `init_error`, `count_error` to script a scenario."""

    NVMLError = NVMLError

    def __init__(self, devices: list[FakeDevice] | None = None) -> None:
        super().__init__("pynvml")
        for name, value in globals().items():
            if name.startswith("NVML_"):
                setattr(self, name, value)
        self.devices: list[FakeDevice] = list(devices or [])
        self.init_error: int | None = None
        self.count_error: int | None = None
        self.initialized = False
        self.init_calls = 0
        self.shutdown_calls = 0

    def _check(self) -> None:
        if not self.initialized:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _dev(self, handle: Any, function: str) -> FakeDevice:
        self._check()
        device: FakeDevice = handle
        if function in device.errors:
            raise NVMLError(device.errors[function])
        return device

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._check()
        self.shutdown_calls += 1
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        if self.count_error is not None:
            raise NVMLError(self.count_error)
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        self._check()
        if not 0 <= index < len(self.devices):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self._dev(self.devices[index], "nvmlDeviceGetHandleByIndex")

    def nvmlDeviceGetName(self, handle: Any) -> str | bytes:
        return self._dev(handle, "nvmlDeviceGetName").name

    def nvmlDeviceGetUUID(self, handle: Any) -> str | bytes:
        return self._dev(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> FakeMemory:
        d = self._dev(handle, "nvmlDeviceGetMemoryInfo")
        return FakeMemory(total=d.total, used=d.used, free=d.total - d.used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[FakeProcess]:
        return list(self._dev(handle, "nvmlDeviceGetComputeRunningProcesses").compute)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[FakeProcess]:
        return list(self._dev(handle, "nvmlDeviceGetGraphicsRunningProcesses").graphics)

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        d = self._dev(handle, "nvmlDeviceGetMigMode")
        return [d.mig_mode, d.mig_mode]


def install(monkeypatch: pytest.MonkeyPatch, devices: list[FakeDevice] | None = None) -> FakePynvml:
    """Put a fresh fake into sys.modules["pynvml"] for the current test and return it."""
    fake = FakePynvml(devices)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake
