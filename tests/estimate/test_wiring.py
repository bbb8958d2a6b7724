"""`vram: "auto"` through the service, a real daemon and the CLI: the ledger reserves exactly the estimate,
the estimate is kept with the model (show, state file, restart without re-reading), and bad input changes
nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    FAST_CONFIG,
    Daemon,
    InProcess,
    control_connection,
    run_in_process,
    tiny_command,
    tiny_engine_body,
)
from modelfiles import LLAMA31_8B, QWEN25_7B, GiB, MiB, hub_model, llama_gguf, write_hf_model

from gpud.cli import main as cli
from gpud.errors import InvalidInput
from gpud.registry import Model
from gpud.spec import ModelSpec

QWEN_WEIGHTS = 2 * 7_615_616_512


def ceil_mib(n: int) -> int:
    return -(-n // MiB) * MiB


def qwen_per_gpu(context: int, sequences: int = 4, gpus: int = 1, overhead: int = 2 * GiB) -> int:
    return ceil_mib(-(-(QWEN_WEIGHTS + 56 * 1024 * context * sequences) // gpus) + overhead)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2.5-7B-Instruct's config and its four shards' headers (15 GB of holes)."""
    path = tmp_path_factory.mktemp("models") / "Qwen2.5-7B-Instruct"
    assert write_hf_model(path, QWEN25_7B, shards=4) == QWEN_WEIGHTS
    return path


# ---- the service, in process -------------------------------------------------------------------------


async def _settled(h: InProcess, model: Model) -> None:
    await h.wait(lambda: model.operation is None, what=f"{model.name} to settle")


def test_the_ledger_reserves_exactly_the_estimate_and_keeps_it(tmp_path: Path, qwen: Path) -> None:
    body = tiny_engine_body(model=str(qwen), vram="auto", replicas=3, context_tokens=8192, kv_sequences=2)
    expected = qwen_per_gpu(8192, 2)

    async def scenario(h: InProcess) -> None:
        model = await h.service.start_model(ModelSpec.from_json(body))
        await _settled(h, model)
        assert h.reserved() == [2 * expected, expected]
        shown = h.service.show(model)
        assert shown["vram_bytes"] == expected and [r["vram_bytes"] for r in shown["replicas"]] == [expected] * 3
        assert shown["estimate"]["per_gpu_bytes"] == expected and shown["estimate"]["sequences"] == 2
        assert shown["estimate"]["source"] == str(qwen)
        await h.service.scale("tiny", 4)
        await _settled(h, model)
        assert h.reserved() == [2 * expected, 2 * expected]
        saved = json.loads((tmp_path / "state.json").read_text())["models"]["tiny"]
        assert saved["vram"] == "auto" and saved["estimate"] == shown["estimate"]
        assert saved["context_tokens"] == 8192 and saved["kv_sequences"] == 2
        plan = await h.service.plan({"model": str(qwen), "vram": "auto", "engine": "sim"})
        assert plan["fits"] is True and plan["estimate"]["per_gpu_bytes"] == qwen_per_gpu(32768)
        assert (await h.service.plan({"vram": "10GiB"}))["estimate"] is None
        with pytest.raises(InvalidInput, match="needs the model whose files it reads"):
            await h.service.plan({"vram": "auto"})

    run_in_process(scenario, tmp_path)


def test_a_bad_model_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()

    async def scenario(h: InProcess) -> None:
        for model in (str(empty), "org/not-cached"):
            with pytest.raises(InvalidInput) as caught:
                await h.service.start_model(ModelSpec.from_json(tiny_engine_body(model=model, vram="auto")))
            assert caught.value.message.endswith("; pass --vram SIZE.")
            assert not h.registry.models and h.reserved() == [0, 0] and not (tmp_path / "state.json").exists()

    run_in_process(scenario, tmp_path)


def test_request_fields() -> None:
    spec = ModelSpec.from_json({"model": "m", "vram": "AUTO", "context_tokens": 4096, "kv_sequences": 1})
    assert spec.vram_auto and spec.needs_estimate and spec.vram_bytes is None
    assert spec.to_json()["vram"] == "auto"
    for body, expected in [
        ({"model": "m", "vram": "1GiB", "context_tokens": 10}, 'only apply with vram "auto"'),
        ({"model": "m", "kv_sequences": 2}, 'only apply with vram "auto"'),
        ({"model": "m", "vram": "auto", "kv_sequences": 0}, "Invalid kv_sequences 0"),
        ({"model": "m", "vram": "auto", "context_tokens": "8k"}, "Invalid context_tokens"),
        ({"model": "m", "vram": "auto", "estimate": {}}, "Unknown field 'estimate'"),  # only a state file has one
        ({"model": "m", "vram": "automatic"}, "Invalid vram 'automatic'"),
    ]:
        with pytest.raises(InvalidInput, match=expected):
            ModelSpec.from_json(body)


# ---- a real daemon -----------------------------------------------------------------------------------


def _gpus(daemon: Daemon) -> list[int]:
    return [g["reserved_bytes"] for g in daemon.client.request("GET", "/v1/gpus")["gpus"]]


def _post(daemon: Daemon, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    conn = control_connection(daemon)
    try:
        conn.request("POST", "/v1/models", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_through_a_real_daemon(make_daemon: Any, qwen: Path, tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    hub_model(hub, "meta-llama/Llama-3.1-8B-Instruct", lambda d: write_hf_model(d, LLAMA31_8B))
    other_hub = tmp_path / "other-hub"
    hub_model(other_hub, "meta-llama/Llama-3.1-8B-Instruct", lambda d: write_hf_model(d, {**LLAMA31_8B,
                                                                                          "num_hidden_layers": 16}))
    gguf = tmp_path / "llama-3.2-1b-q8_0.gguf"
    gguf_weights = llama_gguf(gguf)
    llama_per_token = 2 * 32 * 8 * 128 * 2
    config = FAST_CONFIG + f'''
[estimate]
kv_sequences = 2
overhead = "1GiB"

[env]
HF_HUB_CACHE = "{hub}"

[models.declared]
model = "meta-llama/Llama-3.1-8B-Instruct"
engine = "sim"
vram = "auto"
context_tokens = 4096
'''
    daemon = make_daemon(gpus="sim:2x80GiB", config=config).start()
    llama = ceil_mib(2 * 8_030_261_248 + llama_per_token * 4096 * 2 + GiB)
    declared = daemon.wait_idle("declared")
    assert declared["estimate"]["per_gpu_bytes"] == llama == declared["vram_bytes"]
    assert declared["estimate"]["source"].startswith(str(hub))  # [env] HF_HUB_CACHE: where the replica looks

    out = daemon.cli("model", "start", str(qwen), "--engine", "sim", "--vram", "auto", "--replicas", "2",
                     "--gpus-per-replica", "2", "--context-tokens", "16384", "--kv-sequences", "3", "-o", "json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    qwen_gpu = qwen_per_gpu(16384, 3, gpus=2, overhead=GiB)
    assert shown["name"] == "Qwen2.5-7B-Instruct" and shown["estimate"]["per_gpu_bytes"] == qwen_gpu
    assert _gpus(daemon) == [llama + 2 * qwen_gpu, 2 * qwen_gpu]
    assert "Estimate:" in daemon.cli("model", "show", "Qwen2.5-7B-Instruct").stdout

    # The model's own env names another cache: that is where its replicas look, so gpud looks there too.
    status, body = _post(daemon, {"name": "mine", "model": "meta-llama/Llama-3.1-8B-Instruct", "engine": "sim",
                                  "vram": "auto", "context_tokens": 1024, "env": {"HF_HUB_CACHE": str(other_hub)}})
    assert status == 201 and body["estimate"]["layers"] == 16
    daemon.wait_idle("mine")
    mine = body["estimate"]["per_gpu_bytes"]

    # The command engine passes --max-model-len through to the server; the estimate reads it.
    out = daemon.cli("model", "start", str(gguf), "--command", tiny_command(), "--vram", "auto", "-o",
                     "json", "--", "--max-model-len", "2048")
    assert out.returncode == 0, out.stderr
    small = json.loads(out.stdout)
    assert small["name"] == "llama-3.2-1b-q8_0"
    assert small["estimate"]["per_gpu_bytes"] == ceil_mib(gguf_weights + 32768 * 2048 * 2 + GiB)
    before = _gpus(daemon)

    # Bad input: 422, one sentence, nothing placed, reserved or started.
    for bad in ({"model": "org/not-cached", "engine": "sim", "vram": "auto"},
                {"model": str(tmp_path), "engine": "sim", "vram": "auto", "name": "dir"},
                {"model": str(gguf), "engine": "sim", "vram": "auto", "name": "kv", "context_tokens": 0}):
        status, body = _post(daemon, bad)
        assert status == 422 and body["error"]["code"] == "invalid", body
    assert body["error"]["message"] == "Invalid context_tokens 0: expected a number from 1 to 1073741824."
    out = daemon.cli("model", "start", "org/not-cached", "--engine", "sim", "--vram", "auto")
    assert out.returncode == 2 and out.stderr.endswith("; pass --vram SIZE.\n") and out.stderr.count("\n") == 1
    assert _gpus(daemon) == before
    names = {m["name"] for m in daemon.client.request("GET", "/v1/models")["models"]}
    assert names == {"declared", "Qwen2.5-7B-Instruct", "mine", "llama-3.2-1b-q8_0"}

    # `gpud plan MODEL --vram auto` through the daemon carries the estimate.
    out = daemon.cli("plan", str(qwen), "--vram", "auto", "-o", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["estimate"]["per_gpu_bytes"] == qwen_per_gpu(32768, 2, overhead=GiB)

    # A restart reserves what the state file says, without reading the files again (they are gone now).
    daemon.stop()
    shutil.rmtree(qwen.parent / "gone", ignore_errors=True)
    qwen.rename(qwen.parent / "gone")
    gguf.unlink()
    try:
        daemon.start()
        for name in ("Qwen2.5-7B-Instruct", "mine", "llama-3.2-1b-q8_0", "declared"):
            daemon.wait_idle(name)
        assert _gpus(daemon) == before
        assert daemon.show("mine")["estimate"]["per_gpu_bytes"] == mine
    finally:
        (qwen.parent / "gone").rename(qwen)


# ---- the CLI without a daemon ------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--socket", "/nonexistent/gpud.sock", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_with_gpus_estimates_in_the_cli_process(capsys: pytest.CaptureFixture[str], qwen: Path) -> None:
    code, out, err = run(capsys, "plan", str(qwen), "--gpus", "sim:2x80GiB", "--vram", "auto", "--replicas", "3",
                         "-o", "json", "--", "--max-model-len", "32768")
    assert (code, err) == (0, "")
    plan = json.loads(out)
    expected = qwen_per_gpu(32768)
    assert plan["estimate"]["per_gpu_bytes"] == expected and plan["estimate"]["kv_bytes_per_token"] == 57344
    assert [(r["gpus"], r["vram_bytes"]) for r in plan["replicas"]] == [([0], expected), ([1], expected),
                                                                         ([0], expected)]
    code, out, err = run(capsys, "plan", str(qwen), "--gpus", "sim:2x80GiB", "--vram", "auto", "--",
                         "--max-model-len", "32768")
    assert code == 0
    assert "weights   14.2 GiB" in out and "KV cache  7 GiB" in out and "overhead  2 GiB" in out
    assert "56 KiB/token (2 × 28 layers × 4 KV heads × 128 × 2 B) × 32768 tokens (--max-model-len) × 4 sequences" \
        in out
    assert "per GPU   23.2 GiB" in out and out.rstrip().endswith("GPU 0 hosts replica 0.")
    # Too big for the GPUs: the estimate still shows why, and the exit is 4.
    code, out, err = run(capsys, "plan", str(qwen), "--gpus", "sim:1x16GiB", "--vram", "auto")
    assert code == 4 and "per GPU" in out and "does not fit" in err.lower()


def test_plan_and_start_refuse_bad_auto_requests(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for argv, expected in [
        (("plan", "--gpus", "sim:80GiB", "--vram", "auto"), "--vram auto needs the model whose files it reads"),
        (("plan", "--gpus", "sim:80GiB", "--vram", "1GiB", "--context-tokens", "5"), "only apply with --vram auto"),
        (("model", "start", "m", "--kv-sequences", "2"), "only apply with --vram auto"),
        (("model", "start", "m", "--vram", "auto", "--kv-sequences", "0"), "Invalid --kv-sequences 0"),
        (("plan", str(tmp_path), "--gpus", "sim:80GiB", "--vram", "auto"), f"from {tmp_path}: it has no config.json"),
        (("status", "--", "x"), "only accepted by `gpud model start` and `gpud plan`"),
    ]:
        code, out, err = run(capsys, *argv)
        assert code == 2 and expected in err and err.count("\n") == 1, (argv, err)


def test_estimate_settings_in_the_config_file(tmp_path: Path) -> None:
    from gpud.config import EstimateSettings, load_settings

    path = tmp_path / "gpud.toml"
    assert load_settings({"config": None}, {"HOME": str(tmp_path)}).estimate == EstimateSettings()
    assert (EstimateSettings().kv_sequences, EstimateSettings().overhead_bytes) == (4, 2 * GiB)
    path.write_text('[estimate]\nkv_sequences = 8\noverhead = "1.5GiB"\n')
    assert load_settings({"config": str(path)}, {}).estimate == EstimateSettings(8, 3 * GiB // 2)
    for text, expected in [
        ("kv_sequences = 0", "'estimate.kv_sequences' in .* must be at least 1"),
        ('kv_sequences = "4"', "'estimate.kv_sequences' in .* must be an? integer"),
        ('overhead = "lots"', "Invalid estimate.overhead in .*: expected a size"),
        ("sequences = 4", "Unknown config key 'estimate.sequences'"),
    ]:
        path.write_text(f"[estimate]\n{text}\n")
        with pytest.raises(InvalidInput, match=expected):
            load_settings({"config": str(path)}, {})


def test_the_cli_estimates_without_importing_the_daemon_s_libraries(qwen: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from gpud.cli import main; "
            f"rc = main.main(['plan', {str(qwen)!r}, '--gpus', 'sim:80GiB', '--vram', 'auto', '-o', 'json']); "
            "print(rc, sorted(m for m in ('aiohttp', 'psutil', 'prometheus_client', 'uvloop') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines()[-1] == "0 []", done.stderr
