"""Supervision through a real daemon: health-check failures, drain on stop, one start at a time per GPU."""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request

from helpers import Daemon, wait_until

from gpud.cli.client import model_path


def test_a_frozen_replica_fails_health_checks_and_is_restarted(daemon: Daemon) -> None:
    shown = daemon.start_model({"model": "m", "engine": "sim", "vram": "1GiB", "replicas": 2})
    frozen = shown["replicas"][0]
    os.kill(frozen["pid"], signal.SIGSTOP)  # accepts nothing, answers nothing: like a wedged engine
    try:
        replica = wait_until(lambda: (r := daemon.show("m")["replicas"][0])["restarts"] == 1 and r, 20,
                             "the frozen replica to be restarted")
    finally:
        try:
            os.kill(frozen["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert "failed 3 health checks in a row" in replica["message"]
    wait_until(lambda: daemon.show("m")["replicas"][0]["state"] == "ready", 20, "it to be ready again")
    assert daemon.show("m")["replicas"][1]["restarts"] == 0
    assert not os.path.exists(f"/proc/{frozen['pid']}") or "Z" in open(f"/proc/{frozen['pid']}/stat").read().split()[2]


def test_stop_drains_a_request_in_flight(daemon: Daemon) -> None:
    daemon.start_model({"model": "m", "engine": "sim", "vram": "1GiB", "args": ["--itl-ms", "20"]})
    result: dict[str, object] = {}

    def stream() -> None:
        body = json.dumps({"model": "m", "prompt": "x", "max_tokens": 60, "stream": True}).encode()
        req = urllib.request.Request(f"{daemon.proxy_url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            result["events"] = sum(1 for line in resp if line.startswith(b"data: {"))

    worker = threading.Thread(target=stream)
    worker.start()
    wait_until(lambda: daemon.show("m")["replicas"][0]["inflight"] == 1, 10, "the request to be in flight")
    daemon.client.request("DELETE", model_path("m"))
    assert daemon.show("m")["replicas"][0]["state"] == "stopping"
    worker.join(30)
    assert result["events"] == 60  # the whole stream arrived: the replica was not killed under it
    daemon.wait_removed("m")


def test_replicas_sharing_a_gpu_start_one_at_a_time(daemon: Daemon) -> None:
    shown = daemon.start_model({"model": "m", "engine": "sim", "vram": "1GiB", "replicas": 3, "gpu_idx": [0],
                                "args": ["--startup-s", "0.3"]}, settle=False)
    seen_starting: set[int] = set()

    def observe() -> bool:
        replicas = daemon.show("m")["replicas"]
        starting = [r["index"] for r in replicas if r["state"] == "starting"]
        assert len(starting) <= 1, f"two replicas starting together on GPU0: {starting}"
        seen_starting.update(starting)
        return all(r["state"] == "ready" for r in replicas)

    wait_until(observe, 30, "all replicas ready")
    assert shown["replicas"][0]["gpus"] == [0]
    assert seen_starting  # the observation did see starts


def test_rolling_restart_keeps_the_model_serving(daemon: Daemon) -> None:
    shown = daemon.start_model({"model": "m", "engine": "sim", "vram": "1GiB", "replicas": 2,
                                "args": ["--startup-s", "0.3"]})
    old = {r["index"]: r["pid"] for r in shown["replicas"]}
    daemon.client.request("POST", model_path("m", "restart"), {"rolling": True})
    lowest_ready = 2

    def done() -> bool:
        nonlocal lowest_ready
        now = daemon.show("m")
        lowest_ready = min(lowest_ready, now["replicas_ready"])
        return not now["busy"]

    wait_until(done, 30, "the rolling restart to finish")
    after = daemon.show("m")
    assert after["replicas_ready"] == 2
    assert all(r["pid"] != old[r["index"]] for r in after["replicas"])
    assert all(r["restarts"] == 0 for r in after["replicas"])  # a requested restart is not a failure
    assert lowest_ready >= 1  # one replica at a time


def test_plain_restart_replaces_every_process(daemon: Daemon) -> None:
    out = daemon.cli("model", "start", "m", "--engine", "sim", "--vram", "1GiB", "--replicas", "2", "-o", "json")
    old = {r["pid"] for r in json.loads(out.stdout)["replicas"]}
    out = daemon.cli("model", "restart", "m", "-o", "json")
    assert out.returncode == 0, out.stderr
    shown = daemon.show("m")
    assert shown["replicas_ready"] == 2 and not old & {r["pid"] for r in shown["replicas"]}
