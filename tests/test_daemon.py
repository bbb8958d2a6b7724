"""End to end: a real daemon on simulated GPUs, real replica processes (sim engine), the real proxy."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import Daemon, wait_until

from gpud.cli.client import model_path
from gpud.errors import Conflict, DoesNotFit, InvalidInput, NotFound

GiB = 2**30
DEMO = {"model": "demo", "engine": "sim", "replicas": 3, "vram": "20GiB", "env": {"A": "0", "HF_TOKEN": "hunter2"},
        "args": ["--startup-s", "0.2"]}


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def completion(daemon: Daemon, model: str = "demo") -> tuple[int, str]:
    req = urllib.request.Request(
        f"{daemon.proxy_url}/v1/completions",
        data=json.dumps({"model": model, "prompt": "hi", "max_tokens": 2}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.headers["X-Gpud-Replica"]


def test_three_replicas_on_two_gpus_are_spread_reserved_and_served(daemon: Daemon) -> None:
    shown = daemon.start_model(DEMO)
    assert shown["state"] == "running" and shown["replicas_ready"] == 3
    gpus = {r["index"]: r["gpus"] for r in shown["replicas"]}
    assert gpus == {0: [0], 1: [1], 2: [0]}
    assert shown["env"] == {"A": "0", "HF_TOKEN": "***"}
    assert shown["endpoint"] == f"{daemon.proxy_url}/v1"

    ledger = daemon.client.request("GET", "/v1/gpus")["gpus"]
    assert [g["reserved_bytes"] for g in ledger] == [40 * GiB, 20 * GiB]
    assert [g["available_bytes"] for g in ledger] == [40 * GiB - 512 * 2**20, 60 * GiB - 512 * 2**20]
    assert ledger[0]["replicas"] == [  # nothing is measured on simulated GPUs
        {"model": "demo", "index": 0, "reserved_bytes": 20 * GiB, "measured_bytes": None},
        {"model": "demo", "index": 2, "reserved_bytes": 20 * GiB, "measured_bytes": None}]

    for replica in shown["replicas"]:
        env = environ_of(replica["pid"])
        assert env["A"] == "0" and env["HF_TOKEN"] == "hunter2"
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, replica["gpus"]))
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert env["GPUD_MODEL"] == "demo" and env["GPUD_REPLICA"] == str(replica["index"])
        assert env["GPUD_PORT"] == str(replica["port"])

    # 9 sequential requests to 3 idle replicas go 3/3/3.
    answered = [completion(daemon)[1] for _ in range(9)]
    assert sorted(answered) == ["0"] * 3 + ["1"] * 3 + ["2"] * 3


def test_killed_replica_is_restarted_with_its_exit_recorded(daemon: Daemon) -> None:
    shown = daemon.start_model(DEMO)
    victim = shown["replicas"][1]
    os.kill(victim["pid"], signal.SIGKILL)

    def restarted() -> dict | None:
        r = daemon.show("demo")["replicas"][1]
        return r if r["state"] == "ready" and r["restarts"] == 1 else None

    replica = wait_until(restarted, 10, "replica 1 to come back")
    assert replica["pid"] != victim["pid"]
    assert replica["last_exit"] == {"code": None, "signal": "SIGKILL"}
    assert replica["port"] == victim["port"] and replica["gpus"] == victim["gpus"]
    others = [r for r in daemon.show("demo")["replicas"] if r["index"] != 1]
    assert all(r["restarts"] == 0 for r in others)


def test_scale_down_and_up_keeps_indices_stable(daemon: Daemon) -> None:
    shown = daemon.start_model(DEMO)
    pids = {r["index"]: r["pid"] for r in shown["replicas"]}
    daemon.client.request("PATCH", model_path("demo"), {"replicas": 2})
    shown = daemon.wait_idle("demo")
    assert [r["index"] for r in shown["replicas"]] == [0, 1]
    assert {r["index"]: r["pid"] for r in shown["replicas"]} == {0: pids[0], 1: pids[1]}  # untouched
    ledger = daemon.client.request("GET", "/v1/gpus")["gpus"]
    assert [g["reserved_bytes"] for g in ledger] == [20 * GiB, 20 * GiB]
    wait_until(lambda: pids[2] not in daemon.replica_pids(), 10, "removed replica to exit")

    daemon.client.request("PATCH", model_path("demo"), {"replicas": 4})
    shown = daemon.wait_idle("demo")
    assert [r["index"] for r in shown["replicas"]] == [0, 1, 2, 3]
    assert shown["replicas_ready"] == 4


def test_stop_removes_model_reservations_processes_and_state(daemon: Daemon) -> None:
    daemon.start_model(DEMO)
    daemon.client.request("DELETE", model_path("demo"))
    wait_until(lambda: daemon.client.request("GET", "/v1/models")["models"] == [], 20, "model to go")
    ledger = daemon.client.request("GET", "/v1/gpus")["gpus"]
    assert [g["reserved_bytes"] for g in ledger] == [0, 0]
    wait_until(lambda: not daemon.replica_pids(), 10, "replicas to exit")
    state = json.loads((daemon.state_dir / "state.json").read_text())
    assert state["models"] == {}
    with pytest.raises(NotFound):
        daemon.show("demo")


def test_refused_requests_change_nothing(daemon: Daemon) -> None:
    bad_bodies = [
        {"model": "../x", "engine": "sim"},
        {"model": "a", "engine": "nope"},
        {"model": "a", "engine": "sim", "vram": "12 parsecs"},
        {"model": "a", "engine": "sim", "env": {"CUDA_VISIBLE_DEVICES": "1"}},
        {"model": "a", "engine": "sim", "env": {"1BAD": "x"}},
        {"model": "a", "engine": "sim", "replicas": 0},
        {"model": "a", "engine": "sim", "replicas": "3"},
        {"model": "a", "engine": "sim", "gpu_idx": [7]},
        {"model": "a", "engine": "vllm", "args": ["--port", "1"]},
        {"model": "a", "engine": "command"},
        {"model": "a", "surprise": 1},
        [],
    ]
    for body in bad_bodies:
        with pytest.raises(InvalidInput):
            daemon.client.request("POST", "/v1/models", body)  # type: ignore[arg-type]
    with pytest.raises(DoesNotFit) as refused:
        daemon.client.request("POST", "/v1/models", {"model": "big", "engine": "sim", "replicas": 3, "vram": "60GiB"})
    assert refused.value.details["plan"]["fits"] is False
    assert "GPU0" in refused.value.message and "GPU1" in refused.value.message
    assert daemon.client.request("GET", "/v1/models") == {"models": []}
    assert [g["reserved_bytes"] for g in daemon.client.request("GET", "/v1/gpus")["gpus"]] == [0, 0]
    assert not (daemon.state_dir / "state.json").exists()
    assert not daemon.replica_pids()

    daemon.start_model({"model": "a", "engine": "sim", "vram": "1GiB"})
    with pytest.raises(Conflict):
        daemon.client.request("POST", "/v1/models", {"model": "a", "engine": "sim", "vram": "1GiB"})
    assert len(daemon.show("a")["replicas"]) == 1


def test_crash_loop_backs_off_then_fails_and_frees_memory(make_daemon) -> None:
    config = "[supervisor]\nrestart_sec = 0.02\nrestart_max_delay_sec = 0.1\nstart_limit_burst = 2\n"
    daemon = make_daemon(config=config).start()
    daemon.start_model({"model": "good", "engine": "sim", "vram": "10GiB", "gpu_idx": [1]})
    shown = daemon.start_model({"model": "bad", "engine": "sim", "vram": "10GiB", "gpu_idx": [0],
                                "env": {"GPUD_SIM_FAIL_AT_START": "1"}})
    replica = shown["replicas"][0]
    assert shown["state"] == "failed" and replica["state"] == "failed"
    assert replica["restarts"] == 2 and replica["last_exit"] == {"code": 3, "signal": None}
    assert "gave up" in replica["message"]
    ledger = daemon.client.request("GET", "/v1/gpus")["gpus"]
    assert ledger[0]["reserved_bytes"] == 0 and ledger[1]["reserved_bytes"] == 10 * GiB
    assert daemon.show("good")["state"] == "running"


def test_restart_clears_a_failed_replica(make_daemon, tmp_path: Path) -> None:
    config = "[supervisor]\nrestart = \"no\"\n"
    daemon = make_daemon(config=config).start()
    flag = tmp_path / "fail"
    flag.write_text("1")
    # The command engine runs the sim server through a tiny wrapper that fails while the flag file exists.
    wrapper = tmp_path / "wrap.py"
    wrapper.write_text(
        "import os, sys, runpy\n"
        f"if os.path.exists({str(flag)!r}): sys.exit(4)\n"
        "sys.argv = ['simserver', *sys.argv[1:]]\n"
        "runpy.run_module('gpud.sim.server', run_name='__main__')\n"
    )
    import sys as _sys
    template = f"{_sys.executable} {wrapper} --host {{host}} --port {{port}} --startup-s 0"
    shown = daemon.start_model({"model": "flaky", "engine": "command", "command": template, "vram": "5GiB"})
    assert shown["state"] == "failed"
    assert shown["replicas"][0]["last_exit"] == {"code": 4, "signal": None}
    assert daemon.client.request("GET", "/v1/gpus")["gpus"][0]["reserved_bytes"] == 0
    flag.unlink()
    daemon.client.request("POST", model_path("flaky", "restart"), {})
    shown = daemon.wait_idle("flaky")
    assert shown["state"] == "running"
    assert daemon.client.request("GET", "/v1/gpus")["gpus"][0]["reserved_bytes"] == 5 * GiB


def test_sigkilled_daemon_leaves_no_process_and_restores_models(make_daemon) -> None:
    daemon = make_daemon().start()
    shown = daemon.start_model(DEMO)
    pids = [r["pid"] for r in shown["replicas"]]
    daemon.stop(signal.SIGKILL)
    wait_until(lambda: not daemon.replica_pids(), 5, "replicas to die with the daemon")
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()

    daemon.start()
    shown = daemon.wait_idle("demo")
    assert shown["replicas_ready"] == 3
    assert shown["env"]["A"] == "0"


def test_graceful_stop_and_restore(daemon: Daemon) -> None:
    daemon.start_model({**DEMO, "replicas": 2})
    daemon.client.request("PATCH", model_path("demo"), {"replicas": 1})
    daemon.wait_idle("demo")
    assert daemon.stop() == 0
    assert not daemon.replica_pids()
    assert not Path(daemon.socket).exists()
    daemon.start()
    shown = daemon.wait_idle("demo")
    assert shown["replicas_desired"] == 1 and shown["replicas_ready"] == 1


def test_damaged_state_file_is_kept_aside(make_daemon) -> None:
    daemon = make_daemon()
    daemon.state_dir.mkdir(parents=True)
    (daemon.state_dir / "state.json").write_text('{"version": 1, "models": {"x": ')
    daemon.start()
    assert daemon.client.request("GET", "/v1/models") == {"models": []}
    kept = list(daemon.state_dir.glob("state.json.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_text().startswith('{"version"')
    assert "damaged" in daemon.log_text()


def test_declared_models_start_at_boot(make_daemon) -> None:
    config = '[models.boot]\nmodel = "m"\nengine = "sim"\nreplicas = 2\nvram = "1GiB"\nenv = { B = "2" }\n'
    daemon = make_daemon(config=config).start()
    shown = daemon.wait_idle("boot")
    assert shown["model"] == "m" and shown["replicas_ready"] == 2
    assert environ_of(shown["replicas"][0]["pid"])["B"] == "2"


def test_config_env_and_unset_merge_order(make_daemon) -> None:
    config = '[env]\nC = "config"\nD = "config"\n'
    daemon = make_daemon(config=config, env={"E": "daemon", "F": "daemon"}).start()
    shown = daemon.start_model({"model": "m", "engine": "sim", "vram": "1GiB", "env": {"D": "request"},
                                "unset_env": ["F"]})
    env = environ_of(shown["replicas"][0]["pid"])
    assert (env["C"], env["D"], env["E"]) == ("config", "request", "daemon")
    assert "F" not in env


def test_multi_replica_switch_off(make_daemon) -> None:
    daemon = make_daemon(env={"GPUD_ENABLE_SINGLE_GPU_MULTI_REPLICA": "0"}).start()
    with pytest.raises(DoesNotFit):
        daemon.client.request("POST", "/v1/models", {**DEMO})
    shown = daemon.start_model({**DEMO, "replicas": 2})
    assert sorted(r["gpus"][0] for r in shown["replicas"]) == [0, 1]


def test_start_timeout_restarts_a_hung_replica(daemon: Daemon) -> None:
    daemon.start_model({"model": "hang", "engine": "sim", "vram": "1GiB", "start_timeout_sec": 0.5,
                        "env": {"GPUD_SIM_HANG": "1"}}, settle=False)
    replica = wait_until(lambda: (r := daemon.show("hang")["replicas"][0])["restarts"] >= 1 and r, 20,
                         "the hung replica to be restarted")
    assert "did not become ready within 0.5 s" in replica["message"]
    assert replica["state"] != "ready"


def test_socket_is_0660_and_events_stream_starts_with_state(daemon: Daemon) -> None:
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o660
    daemon.start_model({"model": "e", "engine": "sim", "vram": "1GiB"})
    lines = daemon.client.stream_lines("/v1/events", {"model": "e"}, timeout=10)
    first = json.loads(next(lines))
    lines.close()
    assert first["type"] == "model" and first["model"]["state"] == "running"


def test_logs_of_a_replica(daemon: Daemon) -> None:
    daemon.start_model({"model": "Org/Name-1.5B", "engine": "sim", "vram": "1GiB"})
    conn_text = wait_until(lambda: daemon.cli("model", "logs", "Org/Name-1.5B", "-n", "5").stdout, 10, "log lines")
    assert "listening" in conn_text
    with pytest.raises(NotFound):
        daemon.client.request("GET", model_path("Org/Name-1.5B", "logs"), query={"replica": 3})


def test_sigterm_ends_event_streams_and_log_follows_at_once(daemon: Daemon) -> None:
    daemon.start_model({"model": "e", "engine": "sim", "vram": "1GiB"})
    events = daemon.client.stream_lines("/v1/events", timeout=60)
    assert json.loads(next(events))["type"] == "model"
    follow = daemon.client.stream_lines(model_path("e", "logs"), {"follow": 1, "lines": 1}, timeout=60)
    assert next(follow)
    began = time.monotonic()
    assert daemon.stop(timeout=20) == 0
    # The streams ended (the event stream with its shutdown event) instead of holding up the exit.
    assert [json.loads(line) for line in events][-1]["type"] == "shutdown"
    list(follow)  # returns only once the follow has ended: with the daemon, not at the timeout of 60 s
    assert time.monotonic() - began < 10
