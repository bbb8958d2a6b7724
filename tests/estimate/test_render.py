"""How people see the estimate and the measured memory: the plan's breakdown table, `model show`, `gpus`."""

from __future__ import annotations

from gpud.cli import render
from gpud.estimate.formula import compute

GiB = 2**30


def _estimate(gpus: int = 1) -> dict[str, object]:
    return compute(source="/models/Qwen2.5-7B-Instruct", format="safetensors", weights_bytes=15_231_233_024,
                   layers=28, kv_heads=4, head_dim=128, kv_dtype_bytes=2, context_tokens=32768,
                   context_from="--max-model-len", sequences=4, overhead_bytes=2 * GiB,
                   gpus_per_replica=gpus).to_json()


def test_the_plan_prints_the_breakdown_then_the_placement() -> None:
    plan = {"fits": True, "reason": None, "replicas": [{"index": 0, "gpus": [0, 1], "vram_bytes": 13 * GiB}],
            "estimate": _estimate(2)}
    assert render.format_plan(plan) == "\n".join([
        "Estimate (--vram auto) from /models/Qwen2.5-7B-Instruct:",
        "",
        "PART      SIZE      HOW",
        "weights   14.2 GiB  15,231,233,024 bytes: the tensors in the safetensors headers",
        "KV cache  7 GiB     56 KiB/token (2 × 28 layers × 4 KV heads × 128 × 2 B) × 32768 tokens (--max-model-len)"
        " × 4 sequences",
        "overhead  2 GiB     per GPU: CUDA context, activations, graphs",
        "per GPU   12.6 GiB  (weights + KV cache) ÷ 2 GPUs + overhead, rounded up to a MiB",
        "",
        "Fits: 1 replica.",
        "",
        "REPLICA  GPUS  VRAM",
        "0        0,1   13 GiB",
        "",
        "GPU 0 hosts replica 0; GPU 1 hosts replica 0.",
    ])
    assert render.format_plan({**plan, "estimate": None}).startswith("Fits: 1 replica.")


def test_model_show_has_the_estimate_and_on_nvml_what_replicas_use() -> None:
    replica = {"index": 0, "state": "ready", "pid": 7, "gpus": [0], "vram_bytes": 24 * GiB, "port": 4000,
               "restarts": 0, "inflight": 0, "last_exit": None, "measured_bytes": 20 * GiB}
    show = {"name": "q", "model": "/m", "engine": "vllm", "state": "running", "replicas_desired": 1,
            "replicas_ready": 1, "endpoint": "http://127.0.0.1:8000/v1", "estimate": _estimate(),
            "replicas": [replica]}
    lines = render.format_model_show(show).splitlines()
    assert "Estimate:  23.2 GiB per GPU (--vram auto): weights 14.2 GiB + KV 7 GiB (32768 tokens × 4 sequences), " \
           "overhead 2 GiB" in lines
    assert lines[-2].split() == ["INDEX", "STATE", "PID", "GPUS", "VRAM", "USED", "PORT", "RESTARTS", "INFLIGHT",
                                 "LAST", "EXIT"]
    assert lines[-1].split()[4:7] == ["24", "GiB", "20"]
    sim = render.format_model_show({**show, "estimate": None, "replicas": [{**replica, "measured_bytes": None}]})
    assert "USED" not in sim and "Estimate" not in sim


def test_gpus_show_what_each_replica_uses_of_its_reservation() -> None:
    gpu = {"index": 0, "name": "NVIDIA H100", "total_bytes": 80 * GiB, "used_by_others_bytes": 0,
           "reserved_bytes": 20 * GiB, "available_bytes": 60 * GiB,
           "replicas": [{"model": "q", "index": 0, "reserved_bytes": 10 * GiB, "measured_bytes": 9 * GiB + GiB // 10},
                        {"model": "q", "index": 1, "reserved_bytes": 10 * GiB, "measured_bytes": None}]}
    assert render.format_gpus({"gpus": [gpu]}).splitlines()[1].endswith("q#0 (used 9.1 GiB of 10 GiB) q#1")
