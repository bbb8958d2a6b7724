"""GPU backends: the sim spec parser and backend, open_backend, and the NVML backend over a fake pynvml."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from fakes import fake_pynvml as fp

from gpud.errors import GpudError, InvalidInput
from gpud.gpus import open_backend, parse_sim_spec
from gpud.gpus.base import DeviceReading, GpuProcess
from gpud.gpus.nvml import MIG_REASON, NvmlBackend
from gpud.gpus.sim import MAX_SIM_DEVICES, SimBackend

FakeDevice, FakeProcess, FakePynvml, install = fp.FakeDevice, fp.FakeProcess, fp.FakePynvml, fp.install

GiB = 2**30
MiB = 2**20


# --- sim spec -------------------------------------------------------------------------------------------


def test_sim_count_and_size() -> None:
    devices = parse_sim_spec("sim:2x80GiB")
    assert [d.index for d in devices] == [0, 1]
    assert all(d.total_bytes == 80 * GiB and d.used_bytes == 0 and d.ok and d.processes == () for d in devices)
    assert devices[0].name == "Simulated GPU 80GiB"
    assert devices[0].uuid == "GPU-sim-0000-0000-0000-000000000000"
    assert devices[1].uuid == "GPU-sim-0001-0000-0000-000000000000"


def test_sim_items_with_used_memory() -> None:
    devices = parse_sim_spec("sim:80GiB,40GiB@10GiB")
    assert [(d.index, d.total_bytes, d.used_bytes) for d in devices] == [(0, 80 * GiB, 0), (1, 40 * GiB, 10 * GiB)]
    assert devices[1].name == "Simulated GPU 40GiB"


def test_sim_mixed_counts_spaces_and_units() -> None:
    devices = parse_sim_spec(" sim: 2 x 24GiB@1.5GiB , 1x500MB,3X1G@1G ")
    assert [d.total_bytes for d in devices] == [24 * GiB, 24 * GiB, 500 * 10**6, GiB, GiB, GiB]
    assert [d.used_bytes for d in devices] == [1536 * MiB, 1536 * MiB, 0, GiB, GiB, GiB]
    assert [d.index for d in devices] == list(range(6))
    assert len({d.uuid for d in devices}) == 6


def test_sim_prefix_optional_and_deterministic() -> None:
    assert parse_sim_spec("2x24GiB") == parse_sim_spec("sim:2x24GiB") == parse_sim_spec("SIM:2x24GiB")


def test_sim_max_devices_allowed() -> None:
    assert len(parse_sim_spec(f"sim:{MAX_SIM_DEVICES}x1GiB")) == MAX_SIM_DEVICES


@pytest.mark.parametrize(
    ("spec", "quoted"),
    [
        ("sim:", "'sim:'"),
        ("sim:   ", "'sim:   '"),
        ("sim:80GiB,", "item 2 is empty"),
        ("sim:,80GiB", "item 1 is empty"),
        ("sim:80GiB,,40GiB", "item 2 is empty"),
        ("sim:0x80GiB", "'0x80GiB'"),
        ("sim:x80GiB", "'x80GiB'"),
        ("sim:-1x80GiB", "'-1x80GiB'"),
        ("sim:ax80GiB", "'ax80GiB'"),
        ("sim:1.5x80GiB", "'1.5x80GiB'"),
        ("sim:2x", "'2x'"),
        ("sim:0GiB", "'0GiB'"),
        ("sim:0", "'0'"),
        ("sim:80XB", "'80XB'"),
        ("sim:80GiB@", "'80GiB@'"),
        ("sim:80GiB@lots", "'80GiB@lots'"),
        ("sim:80GiB@1@2", "'80GiB@1@2'"),
        ("sim:40GiB@41GiB", "'40GiB@41GiB'"),
        ("sim:80QiB", "'80QiB'"),
        ("sim:-80GiB", "'-80GiB'"),
        (f"sim:{MAX_SIM_DEVICES + 1}x1GiB", f"past {MAX_SIM_DEVICES}"),
        (f"sim:{MAX_SIM_DEVICES}x1GiB,1GiB", "'1GiB' brings the total past"),
        ("sim:99999999999999x1GiB", "past"),
    ],
)
def test_sim_bad_specs(spec: str, quoted: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_sim_spec(spec)
    message = info.value.message
    assert quoted in message
    # One sentence: ends with a period, no second sentence glued on.
    assert message.endswith(".") and ". " not in message.replace("e.g. ", "")


def test_sim_used_equal_to_size_is_fine() -> None:
    assert parse_sim_spec("sim:40GiB@40GiB")[0].used_bytes == 40 * GiB


def test_sim_backend_reads_copies_and_can_change() -> None:
    backend = SimBackend(parse_sim_spec("sim:2x24GiB"))
    assert backend.kind == "sim"
    first = backend.read()
    first.clear()  # a caller mutating its list must not affect the backend
    assert len(backend.read()) == 2
    backend.set_used(1, 4 * GiB, [GpuProcess(pid=42, used_bytes=4 * GiB)])
    device = backend.read()[1]
    assert device.used_bytes == 4 * GiB and device.processes == (GpuProcess(42, 4 * GiB),)
    backend.set_ok(0, False, "fell off the bus")
    assert backend.read()[0].ok is False and backend.read()[0].reason == "fell off the bus"
    backend.set_ok(0, True)
    assert backend.read()[0].ok and backend.read()[0].reason is None
    with pytest.raises(ValueError):
        backend.set_used(0, 25 * GiB)
    with pytest.raises(IndexError):
        backend.set_used(2, 0)
    backend.close()
    backend.close()


# --- open_backend ---------------------------------------------------------------------------------------


def test_open_backend_sim() -> None:
    backend = open_backend("sim:80GiB,40GiB@10GiB")
    assert isinstance(backend, SimBackend) and backend.kind == "sim"
    assert [d.used_bytes for d in backend.read()] == [0, 10 * GiB]


@pytest.mark.parametrize("spec", ["", "gpu", "sim", "nvml", "2x24GiB", "auto:0", "simulate:2x24GiB"])
def test_open_backend_rejects_unknown_forms(spec: str) -> None:
    with pytest.raises(InvalidInput) as info:
        open_backend(spec)
    assert repr(spec) in info.value.message
    assert "auto" in info.value.message and "sim:" in info.value.message


def test_open_backend_bad_sim_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        open_backend("sim:0x1GiB")


def test_open_backend_auto_uses_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, [FakeDevice()])
    backend = open_backend(" auto ")
    try:
        assert isinstance(backend, NvmlBackend) and backend.kind == "nvml"
        assert len(backend.read()) == 1
    finally:
        backend.close()


def _assert_suggests_sim(err: GpudError) -> None:
    assert type(err) is GpudError and err.exit_code == 1
    assert "--gpus sim:2x24GiB" in err.message


def test_auto_without_pynvml_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(GpudError) as info:
        open_backend("auto")
    _assert_suggests_sim(info.value)
    assert "nvidia-ml-py" in info.value.message


@pytest.mark.parametrize(
    ("code", "text"),
    [(fp.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML Shared Library Not Found"), (fp.NVML_ERROR_DRIVER_NOT_LOADED, "Driver Not Loaded")],
)
def test_auto_init_failure(monkeypatch: pytest.MonkeyPatch, code: int, text: str) -> None:
    fake = install(monkeypatch, [FakeDevice()])
    fake.init_error = code
    with pytest.raises(GpudError) as info:
        open_backend("auto")
    _assert_suggests_sim(info.value)
    assert text in info.value.message and "initialised" in info.value.message


def test_auto_init_raises_non_nvml_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch)

    def broken() -> None:
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    monkeypatch.setattr(fake, "nvmlInit", broken)
    with pytest.raises(GpudError) as info:
        open_backend("auto")
    _assert_suggests_sim(info.value)
    assert "libnvidia-ml.so.1" in info.value.message


def test_auto_zero_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch, [])
    with pytest.raises(GpudError) as info:
        open_backend("auto")
    _assert_suggests_sim(info.value)
    assert "no NVIDIA GPU" in info.value.message
    assert fake.shutdown_calls == 1 and not fake.initialized  # NVML is not left initialised


def test_auto_count_failure_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch, [FakeDevice()])
    fake.count_error = fp.NVML_ERROR_UNKNOWN
    with pytest.raises(GpudError) as info:
        open_backend("auto")
    _assert_suggests_sim(info.value)
    assert "Unknown Error" in info.value.message
    assert fake.shutdown_calls == 1


# --- NVML backend ---------------------------------------------------------------------------------------


def _two_gpus() -> list[FakeDevice]:
    return [
        FakeDevice(name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa", total=80 * GiB, used=30 * GiB,
                   compute=[FakeProcess(100, 20 * GiB), FakeProcess(101, None)],
                   graphics=[FakeProcess(200, 1 * GiB)]),
        FakeDevice(name=b"NVIDIA A100-SXM4-40GB", uuid=b"GPU-bbbb", total=40 * GiB, used=0),
    ]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakePynvml:
    return install(monkeypatch, _two_gpus())


@pytest.fixture
def nvml(fake: FakePynvml) -> Iterator[NvmlBackend]:
    backend = NvmlBackend()
    yield backend
    backend.close()


def test_nvml_reads_devices(fake: FakePynvml, nvml: NvmlBackend) -> None:
    assert fake.init_calls == 1
    first, second = nvml.read()
    assert first == DeviceReading(
        index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa", total_bytes=80 * GiB, used_bytes=30 * GiB,
        processes=(GpuProcess(100, 20 * GiB), GpuProcess(101, 0), GpuProcess(200, GiB)),
    )
    # bytes from old nvidia-ml-py releases are decoded
    assert (second.name, second.uuid, second.total_bytes, second.processes) == (
        "NVIDIA A100-SXM4-40GB", "GPU-bbbb", 40 * GiB, ())
    assert second.ok and second.reason is None
    nvml.read()
    assert fake.init_calls == 1  # NVML is initialised once, not per reading


def test_nvml_merges_process_listed_as_compute_and_graphics(fake: FakePynvml, nvml: NvmlBackend) -> None:
    fake.devices[1].compute = [FakeProcess(7, 2 * GiB)]
    fake.devices[1].graphics = [FakeProcess(7, 2 * GiB), FakeProcess(8, None)]
    assert nvml.read()[1].processes == (GpuProcess(7, 2 * GiB), GpuProcess(8, 0))


def test_nvml_reading_follows_changes(fake: FakePynvml, nvml: NvmlBackend) -> None:
    fake.devices[1].used = 5 * GiB
    fake.devices[1].compute = [FakeProcess(9, 5 * GiB)]
    reading = nvml.read()[1]
    assert reading.used_bytes == 5 * GiB and reading.processes == (GpuProcess(9, 5 * GiB),)


@pytest.mark.parametrize(
    "function",
    ["nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetMemoryInfo",
     "nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses", "nvmlDeviceGetMigMode"],
)
def test_nvml_error_on_one_device(fake: FakePynvml, nvml: NvmlBackend, function: str) -> None:
    fake.devices[0].errors[function] = fp.NVML_ERROR_GPU_IS_LOST
    first, second = nvml.read()
    assert first.ok is False and first.reason == "NVML error: GPU is lost"
    assert first.index == 0
    assert second.ok  # the other device is unaffected


def test_nvml_failed_device_keeps_last_good_identity(fake: FakePynvml, nvml: NvmlBackend) -> None:
    good = nvml.read()[0]
    fake.devices[0].errors["nvmlDeviceGetMemoryInfo"] = fp.NVML_ERROR_GPU_IS_LOST
    bad = nvml.read()[0]
    assert (bad.name, bad.uuid, bad.total_bytes, bad.used_bytes) == (good.name, good.uuid, good.total_bytes,
                                                                     good.used_bytes)
    assert not bad.ok
    del fake.devices[0].errors["nvmlDeviceGetMemoryInfo"]
    assert nvml.read()[0] == good  # recovers on the next reading


def test_nvml_failed_device_never_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch, _two_gpus())
    fake.devices[1].errors["nvmlDeviceGetUUID"] = fp.NVML_ERROR_UNKNOWN
    backend = NvmlBackend()
    try:
        reading = backend.read()[1]
        assert (reading.index, reading.name, reading.uuid, reading.total_bytes, reading.ok) == (1, "unknown", "", 0,
                                                                                             False)
        assert reading.reason == "NVML error: Unknown Error"
    finally:
        backend.close()


def test_nvml_non_nvml_exception_on_device(fake: FakePynvml, nvml: NvmlBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(handle: object) -> object:
        raise ValueError("garbage from the driver")

    monkeypatch.setattr(fake, "nvmlDeviceGetMemoryInfo", broken)
    readings = nvml.read()
    assert [r.ok for r in readings] == [False, False]
    assert readings[0].reason == "ValueError: garbage from the driver"


@pytest.mark.parametrize("code", [fp.NVML_ERROR_NOT_SUPPORTED, fp.NVML_ERROR_FUNCTION_NOT_FOUND])
def test_nvml_process_listing_unsupported_keeps_device(fake: FakePynvml, nvml: NvmlBackend, code: int) -> None:
    fake.devices[0].errors["nvmlDeviceGetComputeRunningProcesses"] = code
    first = nvml.read()[0]
    assert first.ok and first.processes == (GpuProcess(200, GiB),)  # graphics still listed


def test_nvml_process_listing_no_permission_fails_device(fake: FakePynvml, nvml: NvmlBackend) -> None:
    fake.devices[0].errors["nvmlDeviceGetGraphicsRunningProcesses"] = fp.NVML_ERROR_NO_PERMISSION
    first = nvml.read()[0]
    assert not first.ok and first.reason == "NVML error: Insufficient Permissions"


def test_nvml_mig_enabled_device_is_not_ok(fake: FakePynvml, nvml: NvmlBackend) -> None:
    fake.devices[0].mig_mode = fp.NVML_DEVICE_MIG_ENABLE
    # A MIG parent may refuse to list processes; the MIG reason must win over that error.
    fake.devices[0].errors["nvmlDeviceGetComputeRunningProcesses"] = fp.NVML_ERROR_NO_PERMISSION
    first, second = nvml.read()
    assert first.ok is False and first.reason == MIG_REASON
    assert (first.name, first.uuid, first.total_bytes) == ("NVIDIA H100 80GB HBM3", "GPU-aaaa", 80 * GiB)
    assert second.ok


@pytest.mark.parametrize("code", [fp.NVML_ERROR_NOT_SUPPORTED, fp.NVML_ERROR_FUNCTION_NOT_FOUND])
def test_nvml_mig_unsupported_means_no_mig(fake: FakePynvml, nvml: NvmlBackend, code: int) -> None:
    fake.devices[1].errors["nvmlDeviceGetMigMode"] = code
    assert nvml.read()[1].ok


def test_nvml_module_without_mig_function(fake: FakePynvml, nvml: NvmlBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(FakePynvml, "nvmlDeviceGetMigMode")
    assert all(r.ok for r in nvml.read())


def test_nvml_gone_entirely_marks_all_not_ok(fake: FakePynvml, nvml: NvmlBackend) -> None:
    good = nvml.read()
    fake.count_error = fp.NVML_ERROR_GPU_IS_LOST
    readings = nvml.read()
    assert [r.index for r in readings] == [0, 1]
    assert all(not r.ok and r.reason == "NVML stopped answering: GPU is lost" for r in readings)
    assert [r.uuid for r in readings] == [g.uuid for g in good]


def test_nvml_gone_before_any_reading(fake: FakePynvml, nvml: NvmlBackend) -> None:
    fake.count_error = fp.NVML_ERROR_UNKNOWN
    readings = nvml.read()
    assert [(r.index, r.ok, r.name) for r in readings] == [(0, False, "unknown"), (1, False, "unknown")]


def test_nvml_vanished_device_still_listed(fake: FakePynvml, nvml: NvmlBackend) -> None:
    nvml.read()
    del fake.devices[1]
    first, second = nvml.read()
    assert first.ok
    assert (second.index, second.uuid, second.ok) == (1, "GPU-bbbb", False)
    assert second.reason == "the device is no longer reported by NVML"


def test_nvml_new_device_appears(fake: FakePynvml, nvml: NvmlBackend) -> None:
    fake.devices.append(FakeDevice(uuid="GPU-cccc"))
    assert [r.uuid for r in nvml.read()] == ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]


def test_nvml_close_is_idempotent_and_reads_after_close(fake: FakePynvml) -> None:
    backend = NvmlBackend()
    backend.read()
    backend.close()
    backend.close()
    assert fake.shutdown_calls == 1
    readings = backend.read()
    assert [r.ok for r in readings] == [False, False]
    assert readings[0].reason == "the NVML backend is closed"


def test_nvml_close_tolerates_shutdown_error(fake: FakePynvml) -> None:
    backend = NvmlBackend()
    fake.initialized = False  # the fake's nvmlShutdown then raises NVMLError(Uninitialized)
    backend.close()
