"""Operations that overlap or fail half-way leave no process, no reservation and no state behind
(regressions found in review: see each test)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import Daemon, wait_until

from gpud.cli.client import model_path
from gpud.errors import GpudError

SLOW = ["--startup-s", "30"]


def launch_shims(daemon: Daemon) -> list[int]:
    return [p for p in daemon.replica_pids() if b"gpud.supervise.shim" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_a_second_daemon_on_the_same_state_dir_leaves_the_first_ones_replicas_alone(make_daemon) -> None:
    first = make_daemon().start()
    shown = first.start_model({"model": "m", "engine": "sim", "vram": "1GiB", "replicas": 2})
    second = make_daemon()
    second.state_dir = first.state_dir  # same state dir, other socket and port
    second.start(wait=False)
    assert second.proc.wait(30) == 1
    assert second.stop() == 1
    assert "already using the state dir" in second.log_text()
    now = first.show("m")
    assert [r["pid"] for r in now["replicas"]] == [r["pid"] for r in shown["replicas"]]
    assert all(r["restarts"] == 0 and r["state"] == "ready" for r in now["replicas"])


@pytest.mark.parametrize("rolling", [False, True])
def test_stop_during_a_restart_leaves_nothing_running(daemon: Daemon, rolling: bool) -> None:
    daemon.start_model({"model": "m", "engine": "sim", "vram": "1GiB", "replicas": 2})
    daemon.client.request("POST", model_path("m", "restart"), {"rolling": rolling})
    daemon.client.request("DELETE", model_path("m"))
    daemon.wait_removed("m")
    assert daemon.client.request("GET", "/v1/gpus")["gpus"][0]["reserved_bytes"] == 0
    wait_until(lambda: not daemon.replica_pids(), 10, "every replica process to go")
    # And nothing comes back later (a restart that was still going would launch replicas now).
    daemon.start_model({"model": "probe", "engine": "sim", "vram": "1GiB"})
    assert {r["model"] for g in daemon.client.request("GET", "/v1/gpus")["gpus"] for r in g["replicas"]} == {"probe"}
    assert len(launch_shims(daemon)) == 1


def test_stopping_a_replica_waiting_for_its_start_turn_does_not_wait(daemon: Daemon) -> None:
    # Model a takes GPU0's start turn for 30 s; model b's replica waits behind it. Stopping b must not wait.
    daemon.start_model({"model": "a", "engine": "sim", "vram": "1GiB", "gpu_idx": [0], "args": SLOW}, settle=False)
    wait_until(lambda: daemon.show("a")["replicas"][0]["state"] == "starting", 10, "a to be starting")
    daemon.start_model({"model": "b", "engine": "sim", "vram": "1GiB", "gpu_idx": [0]}, settle=False)
    wait_until(lambda: daemon.show("b")["replicas"][0]["state"] == "pending", 10, "b to wait for its turn")
    daemon.client.request("DELETE", model_path("b"))
    daemon.wait_removed("b", timeout=20)
    assert daemon.show("a")["replicas"][0]["state"] == "starting"  # b did not wait for a's start to end


def test_failed_state_write_changes_nothing(daemon: Daemon) -> None:
    daemon.start_model({"model": "m", "engine": "sim", "vram": "1GiB"})
    state = daemon.state_dir / "state.json"
    saved = state.read_text()
    state.unlink()
    state.mkdir()  # every write now fails, as on a full or read-only disk
    try:
        before = daemon.client.request("GET", "/v1/gpus")
        with pytest.raises(GpudError) as err:
            daemon.client.request("PATCH", model_path("m"), {"replicas": 3})
        assert "Cannot save the state" in err.value.message and err.value.code == "error"
        with pytest.raises(GpudError):
            daemon.client.request("DELETE", model_path("m"))
        with pytest.raises(GpudError):
            daemon.client.request("POST", "/v1/models", {"model": "n", "engine": "sim", "vram": "1GiB"})
        shown = daemon.show("m")
        assert (shown["state"], shown["replicas_desired"], len(shown["replicas"])) == ("running", 1, 1)
        assert daemon.client.request("GET", "/v1/gpus") == before
    finally:
        shutil.rmtree(state)
        state.write_text(saved)
    daemon.client.request("PATCH", model_path("m"), {"replicas": 2})  # works again once the disk does
    assert daemon.wait_idle("m")["replicas_ready"] == 2


def test_a_saved_model_that_no_longer_fits_stays_saved_until_stopped(make_daemon) -> None:
    daemon = make_daemon(gpus="sim:1x80GiB").start()
    for name in ("a", "b", "c"):
        daemon.start_model({"model": name, "engine": "sim", "vram": "30GiB" if name != "c" else "1GiB"})
    daemon.stop()
    daemon.gpus = "sim:1x40GiB"  # the machine lost memory: b no longer fits
    daemon.start()
    daemon.wait_idle("a")
    daemon.wait_idle("c")
    assert {m["name"] for m in daemon.client.request("GET", "/v1/models")["models"]} == {"a", "c"}
    saved = json.loads((daemon.state_dir / "state.json").read_text())["models"]
    assert set(saved) == {"a", "b", "c"}
    assert "cannot start model b" in daemon.log_text()
    out = daemon.cli("model", "stop", "b")
    assert out.returncode == 0, out.stderr
    assert set(json.loads((daemon.state_dir / "state.json").read_text())["models"]) == {"a", "c"}
