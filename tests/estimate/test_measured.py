"""Measured against reserved on NVML (the fake pynvml): per replica in `model show`, per GPU in `gpus`, and
one warning when a replica uses more than it reserved. Nothing is measured on the sim backend."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from fakes import fake_pynvml as fp
from helpers import InProcess, run_in_process, tiny_engine_body, wait_until

from gpud.estimate.measured import OveruseWatch, with_measured
from gpud.gpus.ledger import Ledger, OwnedPids, Reservation
from gpud.gpus.nvml import NvmlBackend
from gpud.gpus.sim import SimBackend, parse_sim_spec
from gpud.registry import ReplicaState
from gpud.spec import ModelSpec

GiB = 2**30


def _nvml(monkeypatch: pytest.MonkeyPatch, gpus: int = 2) -> fp.FakePynvml:
    return fp.install(monkeypatch, [fp.FakeDevice(uuid=f"GPU-{i}", total=80 * GiB) for i in range(gpus)])


def test_a_replica_is_measured_over_the_pids_of_its_tree_on_its_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _nvml(monkeypatch)
    owned = OwnedPids()
    ledger = Ledger(NvmlBackend(), headroom_bytes=0, owned=owned)
    ledger.reserve([Reservation("m", 0, (0, 1), (10 * GiB, 10 * GiB)), Reservation("m", 1, (1,), (5 * GiB,))])
    assert ledger.measured("m", 0) is None  # no process yet
    owned.set("m", 0, {100, 101})  # the engine and a worker it forked, like vLLM's EngineCore
    owned.set("m", 1, {200})
    fake.devices[0].compute = [fp.FakeProcess(100, 6 * GiB), fp.FakeProcess(999, 3 * GiB)]  # 999: not gpud's
    fake.devices[0].used = 9 * GiB
    fake.devices[1].compute = [fp.FakeProcess(101, 4 * GiB), fp.FakeProcess(200, 7 * GiB)]
    fake.devices[1].graphics = [fp.FakeProcess(101, GiB)]  # listed twice: counted once (the larger figure)
    fake.devices[1].used = 11 * GiB
    ledger.refresh()
    assert ledger.measured("m", 0) == {0: 6 * GiB, 1: 4 * GiB}
    assert ledger.measured("m", 1) == {1: 7 * GiB}
    gpus = ledger.to_json()["gpus"]
    assert gpus[1]["replicas"] == [
        {"model": "m", "index": 0, "reserved_bytes": 10 * GiB, "measured_bytes": 4 * GiB},
        {"model": "m", "index": 1, "reserved_bytes": 5 * GiB, "measured_bytes": 7 * GiB},
    ]
    assert gpus[0]["used_by_others_bytes"] == 3 * GiB
    show = {"name": "m", "replicas": [{"index": 0, "gpus": [0, 1]}, {"index": 1, "gpus": [1]},
                                      {"index": 2, "gpus": [0]}]}
    replicas = with_measured(show, ledger)["replicas"]
    assert [(r["measured_bytes"], r["measured_by_gpu"]) for r in replicas] == [
        (6 * GiB, [6 * GiB, 4 * GiB]), (7 * GiB, [7 * GiB]), (None, None)]


def test_one_warning_per_replica_over_its_reservation(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    fake = _nvml(monkeypatch, 1)
    owned = OwnedPids()
    ledger = Ledger(NvmlBackend(), headroom_bytes=0, owned=owned)
    ledger.reserve([Reservation("m", 0, (0,), (10 * GiB,)), Reservation("m", 1, (0,), (10 * GiB,))])
    owned.set("m", 0, {100})
    owned.set("m", 1, {200})
    watch = OveruseWatch()
    fake.devices[0].compute = [fp.FakeProcess(100, 10 * GiB), fp.FakeProcess(200, 9 * GiB)]
    ledger.refresh()
    assert watch.check(ledger) == []  # exactly at its reservation is fine
    fake.devices[0].compute = [fp.FakeProcess(100, 12 * GiB), fp.FakeProcess(200, 9 * GiB)]
    caplog.set_level(logging.WARNING, logger="gpud.estimate.measured")
    for _ in range(5):  # every refresh of the daemon's housekeeping
        ledger.refresh()
        watch.check(ledger)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["model 'm' replica 0 uses more GPU memory than it reserved (GPU 0: uses 12 GiB of 10 GiB "
                        "reserved); other replicas on its GPUs may run out of memory: give it a larger --vram "
                        "(or more --context-tokens headroom in the estimate)"]
    # Its reservation ends (stopped), a new one begins: that one is watched afresh.
    ledger.release("m", 0)
    assert watch.check(ledger) == []
    ledger.reserve([Reservation("m", 0, (0,), (10 * GiB,))])
    assert len(watch.check(ledger)) == 1


def test_nothing_is_measured_on_the_sim_backend() -> None:
    owned = OwnedPids()
    ledger = Ledger(SimBackend(parse_sim_spec("sim:80GiB")), headroom_bytes=0, owned=owned)
    ledger.reserve([Reservation("m", 0, (0,), (10 * GiB,))])
    owned.set("m", 0, {100})
    ledger.refresh()
    assert ledger.measured("m", 0) is None
    assert ledger.to_json()["gpus"][0]["replicas"][0]["measured_bytes"] is None
    assert OveruseWatch().check(ledger) == []


def test_model_show_reports_a_real_replica_measured_beside_its_reservation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _nvml(monkeypatch)

    async def scenario(h: InProcess) -> None:
        model = await h.service.start_model(ModelSpec.from_json(tiny_engine_body(vram="10GiB")))
        replica = await h.wait(lambda: model.replicas[0] if model.replicas[0].state is ReplicaState.READY else None)
        assert h.service.show(model)["replicas"][0]["measured_bytes"] == 0  # running, nothing on its GPU yet
        gpu = replica.gpus[0]
        fake.devices[gpu].compute = [fp.FakeProcess(replica.pid or 0, 3 * GiB)]
        fake.devices[gpu].used = 3 * GiB
        h.ledger.refresh()
        shown = h.service.show(model)["replicas"][0]
        assert (shown["vram_bytes"], shown["measured_bytes"], shown["measured_by_gpu"]) == (10 * GiB, 3 * GiB, [3 * GiB])
        assert h.ledger.used_by_others(gpu) == 0  # the replica's memory is its reservation's, not "others'"
        fake.devices[gpu].compute, fake.devices[gpu].used = [], 0  # else the stop waits for the memory to go
        await h.service.stop_model(model.name)
        await h.wait(lambda: model.name not in h.registry.models, what="the model to go")

    run_in_process(scenario, tmp_path, backend=NvmlBackend())


# A `pynvml` module for a daemon subprocess: the fake, its devices read from a JSON file at each refresh
# (the test writes real replica pids into it), each read counted in a file beside it.
FAKE_MODULE = '''
import json, os, sys
sys.path.insert(0, {fakes!r})
import fake_pynvml as fp

class Scripted(fp.FakePynvml):
    def nvmlDeviceGetCount(self):
        path = os.environ["FAKE_NVML_STATE"]
        with open(path) as fh:
            devices = json.load(fh)
        self.devices = [fp.FakeDevice(uuid=f"GPU-{{i}}", total=d["total"], used=d["used"],
                                      compute=[fp.FakeProcess(pid, used) for pid, used in d["procs"]])
                        for i, d in enumerate(devices)]
        with open(path + ".reads", "a") as fh:
            fh.write("x")
        return super().nvmlDeviceGetCount()

sys.modules[__name__] = Scripted()
'''


def test_a_real_daemon_on_nvml_reports_measured_memory_and_warns_once(make_daemon: Any, tmp_path: Path) -> None:
    fakes = Path(__file__).resolve().parent.parent / "fakes"
    (tmp_path / "pynvml.py").write_text(FAKE_MODULE.format(fakes=str(fakes)))
    state = tmp_path / "nvml.json"

    def devices(*procs: list[tuple[int, int]]) -> None:
        body = [{"total": 80 * GiB, "used": sum(u for _, u in p), "procs": p} for p in procs]
        (tmp_path / "nvml.tmp").write_text(json.dumps(body))
        (tmp_path / "nvml.tmp").replace(state)  # the daemon never reads half a file

    def reads() -> int:
        path = Path(str(state) + ".reads")
        return len(path.read_text()) if path.exists() else 0

    devices([], [])
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "FAKE_NVML_STATE": str(state)}
    daemon = make_daemon(gpus="auto", env=env).start()
    shown = daemon.start_model(tiny_engine_body(vram="10GiB"))
    replica = shown["replicas"][0]
    assert replica["measured_bytes"] == 0 and replica["gpus"] == [0]  # on NVML a running replica is measured
    devices([(replica["pid"], 12 * GiB)], [(4242, 3 * GiB)])  # over its 10 GiB; someone else on GPU 1
    wait_until(lambda: daemon.show("tiny")["replicas"][0]["measured_bytes"] == 12 * GiB, 10, "the measurement")
    gpus = daemon.client.request("GET", "/v1/gpus")["gpus"]
    assert gpus[0]["replicas"] == [{"model": "tiny", "index": 0, "reserved_bytes": 10 * GiB,
                                    "measured_bytes": 12 * GiB}]
    assert (gpus[0]["used_by_others_bytes"], gpus[1]["used_by_others_bytes"]) == (0, 3 * GiB)
    assert "tiny#0 (used 12 GiB of 10 GiB)" in daemon.cli("gpus").stdout
    warning = "model 'tiny' replica 0 uses more GPU memory than it reserved (GPU 0: uses 12 GiB of 10 GiB reserved)"
    wait_until(lambda: warning in daemon.log_text(), 10, "the warning")
    seen = reads()
    wait_until(lambda: reads() >= seen + 3, 20, "three more refreshes of the housekeeping loop")
    assert daemon.log_text().count("uses more GPU memory than it reserved") == 1
    devices([], [])  # the replica's memory goes with it, or the stop would wait for the driver to free it
    assert daemon.cli("model", "stop", "tiny").returncode == 0
