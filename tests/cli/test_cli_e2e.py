"""The CLI against a real daemon: the README's flow, documented exit codes, JSON shapes."""

from __future__ import annotations

import json
import os
import signal

from helpers import FAST_CONFIG, Daemon, tiny_command, wait_until


def test_readme_flow(daemon: Daemon) -> None:
    out = daemon.cli("model", "start", "demo", "--engine", "sim", "--replicas", "3", "--vram", "20GiB",
                     "--env", "A=0", "-o", "json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["state"] == "running" and [r["gpus"] for r in shown["replicas"]] == [[0], [1], [0]]

    table = daemon.cli("model", "show", "demo").stdout
    assert "3/3" in table and "A=0" in table
    gpus = daemon.cli("gpus").stdout
    assert "40 GiB" in gpus and "demo#0 demo#2" in gpus
    ledger = json.loads(daemon.cli("gpus", "-o", "json").stdout)
    assert set(ledger["gpus"][0]) >= {"index", "name", "uuid", "total_bytes", "used_by_others_bytes",
                                      "reserved_bytes", "available_bytes", "replicas"}

    os.kill(shown["replicas"][1]["pid"], signal.SIGKILL)
    wait_until(lambda: json.loads(daemon.cli("model", "show", "demo", "-o", "json").stdout)["replicas"][1]["restarts"]
               == 1, 15, "restart")
    wait_until(lambda: "SIGKILL" in daemon.cli("model", "show", "demo").stdout, 15, "the exit to show")

    out = daemon.cli("model", "scale", "demo", "--replicas", "2", "-o", "json")
    assert out.returncode == 0 and [r["index"] for r in json.loads(out.stdout)["replicas"]] == [0, 1]
    listing = json.loads(daemon.cli("model", "list", "-o", "json").stdout)
    assert [m["name"] for m in listing["models"]] == ["demo"]
    out = daemon.cli("model", "stop", "demo")
    assert out.returncode == 0
    assert json.loads(daemon.cli("model", "list", "-o", "json").stdout) == {"models": []}


def test_exit_codes(daemon: Daemon) -> None:
    refused = daemon.cli("model", "start", "big", "--engine", "sim", "--replicas", "3", "--vram", "70GiB")
    assert refused.returncode == 4 and "GPU0" in refused.stderr
    plan = daemon.cli("plan", "--replicas", "3", "--vram", "70GiB", "-o", "json")
    assert plan.returncode == 4 and json.loads(plan.stdout)["fits"] is False
    assert daemon.cli("model", "show", "nope").returncode == 5
    assert daemon.cli("model", "stop", "nope").returncode == 5
    bad = daemon.cli("model", "start", "../x", "--engine", "sim")
    assert bad.returncode == 2 and bad.stderr.startswith("gpud: ") and len(bad.stderr.strip().splitlines()) == 1
    assert daemon.cli("model", "start", "m", "--engine", "sim", "-e", "CUDA_VISIBLE_DEVICES=1").returncode == 2
    assert daemon.cli("model", "start", "m", "--engine", "sim", "--gpu-idx", "9").returncode == 2
    bad_args = daemon.cli("model", "start", "m", "--engine", "sim", "--", "--prefill-ms-per-1k-tokens", "fast")
    assert bad_args.returncode == 2 and "--prefill-ms-per-1k-tokens needs a number" in bad_args.stderr
    unreachable = daemon.cli("--socket", "/nonexistent/gpud.sock", "model", "list")
    assert unreachable.returncode == 3 and "Cannot reach" in unreachable.stderr
    assert daemon.cli("model", "list", "-o", "json").stdout.strip() == '{\n  "models": []\n}'


def test_failed_start_exits_1_with_the_reason(make_daemon) -> None:
    daemon = make_daemon(config="[supervisor]\nrestart = \"no\"\n").start()
    out = daemon.cli("model", "start", "bad", "--engine", "sim", "--vram", "1GiB", "-e", "GPUD_SIM_FAIL_AT_START=1")
    assert out.returncode == 1
    assert "exited with code 3" in out.stderr


def test_logs(daemon: Daemon) -> None:
    daemon.cli("model", "start", "Org/m", "--engine", "sim", "--vram", "1GiB")
    out = wait_until(lambda: (o := daemon.cli("model", "logs", "Org/m", "--replica", "0", "-n", "10")).stdout and o,
                     10, "log lines")
    assert out.returncode == 0 and "listening" in out.stdout
    assert daemon.cli("model", "logs", "Org/m", "--replica", "4").returncode == 5


def test_a_server_without_health_is_ready_on_the_path_it_has(make_daemon) -> None:
    # llama-cpp-python's server has no /health (404): --health-path names one it has.
    daemon = make_daemon(config=FAST_CONFIG + 'restart = "no"\n', env={"MISSING": "/health"}).start()
    ok = daemon.cli("model", "start", "llama", "--engine", "command", "--command", tiny_command(), "--vram", "1GiB",
                    "--health-path", "/v1/models", "-o", "json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["state"] == "running"
    # Without it, the start timeout says which path was polled and what it answered.
    out = daemon.cli("model", "start", "other", "--engine", "command", "--command", tiny_command(), "--vram", "1GiB",
                     "--start-timeout", "1")
    assert out.returncode == 1
    assert "did not become ready within 1 s (GET /health on port" in out.stderr and ": HTTP 404)" in out.stderr
