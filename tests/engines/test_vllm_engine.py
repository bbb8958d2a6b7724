"""The vllm engine end to end: a real daemon runs a fake `vllm` (tests/fakes/vllm.py) found on its PATH.

The fake records its argv, environment and timing, serves /health once "loaded", and leaves a grandchild
(like vLLM's EngineCore) for gpud to clean up. See the fake's docstring for its knobs.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import Daemon

GiB = 2**30
FAKE = Path(__file__).parents[1] / "fakes" / "vllm.py"
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


class FakeVllm:
    """TMP/bin/vllm (the fake, with this interpreter in its shebang) and the directory of its records."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        self.exe = self.bin / "vllm"
        self.exe.write_text(f"#!{sys.executable}\n" + FAKE.read_text())
        self.exe.chmod(0o755)
        self.records_dir = root / "records"

    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                "FAKE_VLLM_RECORDS": str(self.records_dir)}

    def records(self, directory: Path | None = None) -> list[dict[str, Any]]:
        found = sorted((directory or self.records_dir).glob("*.json"))
        return [json.loads(p.read_text()) for p in found]

    def by_replica(self, model: str, directory: Path | None = None) -> dict[int, dict[str, Any]]:
        return {int(r["env"]["GPUD_REPLICA"]): r for r in self.records(directory) if r["env"]["GPUD_MODEL"] == model}


@pytest.fixture
def fake(tmp_path: Path) -> FakeVllm:
    return FakeVllm(tmp_path)


@pytest.fixture
def vllm_daemon(make_daemon: Callable[..., Daemon], fake: FakeVllm) -> Callable[[str], Daemon]:
    return lambda gpus: make_daemon(gpus=gpus, env=fake.env()).start()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_vllm_serve_gets_the_managed_flags_then_the_engine_args_untouched(
    vllm_daemon: Callable[[str], Daemon], fake: FakeVllm
) -> None:
    daemon = vllm_daemon("sim:2x80GiB")
    # Braces, `$`, quotes and spaces: the engine args reach vLLM as given, with no shell and no placeholders.
    engine_args = ["--max-model-len", "4096", "--chat-template", "{% for m in messages %}{{ m.content }} $HOME{% endfor %}",
                   "--override-generation-config", '{"temperature": 0.5}', "--enforce-eager"]
    done = daemon.cli("model", "start", MODEL, "--name", "qwen", "--replicas", "2", "--vram", "20GiB",
                      "-e", "HF_TOKEN=hf_secret", "-o", "json", "--", *engine_args)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["state"] == "running" and shown["engine"] == "vllm" and shown["replicas_ready"] == 2

    records = fake.by_replica("qwen")
    assert sorted(records) == [0, 1]
    for replica in shown["replicas"]:
        record = records[replica["index"]]
        argv = record["argv"]
        assert Path(argv[0]).samefile(fake.exe)  # found on the daemon's PATH (there is no venv)
        assert argv[1:] == [
            "serve", MODEL, "--host", "127.0.0.1", "--port", str(replica["port"]), "--served-model-name", "qwen",
            "--gpu-memory-utilization", "0.25",  # 20 GiB of 80 GiB
            *engine_args,
        ]
        assert record["pid"] == replica["pid"]  # `pid` is the engine itself, not gpud's shim
        env = record["env"]
        assert env["CUDA_VISIBLE_DEVICES"] == str(replica["gpus"][0])
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert (env["GPUD_MODEL"], env["GPUD_PORT"]) == ("qwen", str(replica["port"]))
        assert env["HF_TOKEN"] == "hf_secret"
    assert sorted(r["gpus"][0] for r in shown["replicas"]) == [0, 1]  # spread: one per GPU
    assert [g["reserved_bytes"] for g in daemon.client.request("GET", "/v1/gpus")["gpus"]] == [20 * GiB, 20 * GiB]

    # The proxy routes by the served model name to the fake's OpenAI-style route.
    req = urllib.request.Request(f"{daemon.proxy_url}/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "qwen", "prompt": "hi"}).encode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        assert json.loads(resp.read())["fake_vllm_pid"] in {r["pid"] for r in records.values()}


@pytest.mark.parametrize(("engine_args", "advice"), [
    (["--port", "1"], "--listen"),
    (["--gpu-memory-utilization=0.9"], "--vram"),
    (["--served_model_name", "x"], "--name"),  # vLLM's underscore spelling is the same flag
    (["--enforce-eager", "--host", "0.0.0.0"], "--listen"),
])
def test_a_managed_flag_in_the_engine_args_is_refused_and_leaves_nothing(
    vllm_daemon: Callable[[str], Daemon], fake: FakeVllm, engine_args: list[str], advice: str
) -> None:
    daemon = vllm_daemon("sim:80GiB")
    done = daemon.cli("model", "start", MODEL, "--vram", "20GiB", "--", *engine_args)
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip()
    assert advice in message and "Traceback" not in message and len(message.splitlines()) == 1, message
    assert daemon.client.request("GET", "/v1/models")["models"] == []
    assert daemon.client.request("GET", "/v1/gpus")["gpus"][0]["reserved_bytes"] == 0
    assert fake.records() == []  # vllm never ran


def test_replicas_sharing_a_gpu_start_one_at_a_time_and_others_in_parallel(
    vllm_daemon: Callable[[str], Daemon], fake: FakeVllm
) -> None:
    daemon = vllm_daemon("sim:3x80GiB")
    shared_dir, apart_dir = fake.records_dir / "shared", fake.records_dir / "apart"
    # Two replicas on GPU 0, each "loading" for 0.3 s: vLLM profiles free memory while it starts, so the
    # second must not start before the first is ready.
    daemon.start_model({"model": MODEL, "name": "shared", "replicas": 2, "vram": "20GiB", "gpu_idx": [0],
                        "env": {"FAKE_VLLM_STARTUP_S": "0.3", "FAKE_VLLM_RECORDS": str(shared_dir)}})
    first, second = sorted(fake.by_replica("shared", shared_dir).values(), key=lambda r: r["started"])
    assert first["env"]["CUDA_VISIBLE_DEVICES"] == second["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert first["ready"] <= second["started"], "two replicas on GPU 0 were starting at the same time"

    # On different GPUs they do start together: each waits (barrier) until both have started.
    shown = daemon.start_model({"model": MODEL, "name": "apart", "replicas": 2, "vram": "20GiB", "gpu_idx": [1, 2],
                                "env": {"FAKE_VLLM_BARRIER": "2", "FAKE_VLLM_RECORDS": str(apart_dir)}})
    assert shown["replicas_ready"] == 2
    apart = fake.by_replica("apart", apart_dir)
    assert sorted(r["env"]["CUDA_VISIBLE_DEVICES"] for r in apart.values()) == ["1", "2"]
    assert all(r["barrier_met"] for r in apart.values()), "replicas on different GPUs were started one at a time"


def test_stop_sends_sigterm_and_the_engine_core_grandchild_goes_too(
    vllm_daemon: Callable[[str], Daemon], fake: FakeVllm
) -> None:
    daemon = vllm_daemon("sim:2x80GiB")
    for name in ("a", "b"):
        daemon.start_model({"model": MODEL, "name": name, "vram": "20GiB"})
    a, b = fake.by_replica("a")[0], fake.by_replica("b")[0]
    for record in (a, b):
        assert not gone(record["pid"]) and not gone(record["engine_core_pid"])

    done = daemon.cli("model", "stop", "a")
    assert done.returncode == 0, done.stderr
    # `model stop` returns when the change is done: the whole tree is gone by then, no waiting here.
    assert gone(a["pid"]) and gone(a["engine_core_pid"])
    assert "sigterm" in fake.by_replica("a")[0], "vllm was not asked to stop with SIGTERM"
    ledger = daemon.client.request("GET", "/v1/gpus")["gpus"]
    assert sorted(g["reserved_bytes"] for g in ledger) == [0, 20 * GiB]

    # The daemon's own shutdown (systemd's SIGTERM) does the same for what still runs.
    assert daemon.stop() == 0
    assert "sigterm" in fake.by_replica("b")[0]
    assert gone(b["pid"]) and gone(b["engine_core_pid"])
