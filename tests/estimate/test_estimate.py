"""The estimate end to end from model files on disk, checked to the byte against the formula; the engine
args it reads; config.json nesting; every refusal is one sentence that names the path."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from modelfiles import (
    LLAMA31_8B,
    QWEN25_7B,
    GiB,
    MiB,
    hub_model,
    llama_gguf,
    write_config,
    write_hf_model,
    write_safetensors,
)

from gpud.errors import InvalidInput
from gpud.estimate.args import engine_arg, kv_cache_bytes, max_model_len
from gpud.estimate.formula import Estimate
from gpud.estimate.hfconfig import shape_from_config
from gpud.estimate.model import estimate_model


def estimate(model: str | Path, *args: str, gpus: int = 1, context: int | None = None, sequences: int = 4,
             overhead: int = 2 * GiB, environ: dict[str, str] | None = None) -> Estimate:
    return estimate_model(str(model), args=list(args), gpus_per_replica=gpus, context_tokens=context,
                          sequences=sequences, overhead_bytes=overhead, environ=environ or {})


def ceil_mib(n: int) -> int:
    return -(-n // MiB) * MiB


def test_qwen_7b_sharded_to_the_byte(tmp_path: Path) -> None:
    weights = write_hf_model(tmp_path / "Qwen2.5-7B-Instruct", QWEN25_7B, shards=4)
    assert weights == 2 * 7_615_616_512  # bf16 × the parameter count on the model card
    est = estimate(tmp_path / "Qwen2.5-7B-Instruct", "--max-model-len", "32768")
    assert est.weights_bytes == weights
    assert (est.layers, est.kv_heads, est.head_dim, est.kv_dtype_bytes) == (28, 4, 128, 2)
    assert est.kv_bytes_per_token == 56 * 1024
    assert (est.context_tokens, est.context_from, est.sequences) == (32768, "--max-model-len", 4)
    assert est.per_gpu_bytes == ceil_mib(weights + 56 * 1024 * 32768 * 4 + 2 * GiB)
    assert est.source == str(tmp_path / "Qwen2.5-7B-Instruct") and est.format == "safetensors"


def test_context_and_kv_dtype_come_from_flags_args_or_the_config(tmp_path: Path) -> None:
    model = tmp_path / "llama"
    weights = write_hf_model(model, LLAMA31_8B)
    per_token = 2 * 32 * 8 * 128 * 2
    default = estimate(model)
    assert (default.context_tokens, default.context_from) == (131072, "max_position_embeddings")
    assert estimate(model, "--max-model-len=8k").context_tokens == 8000
    assert estimate(model, "--max_model_len", "8K", "--max-model-len", "4096").context_tokens == 4096  # last wins
    given = estimate(model, "--max-model-len", "8192", context=1000)
    assert (given.context_tokens, given.context_from) == (1000, "--context-tokens")
    fp8 = estimate(model, "--kv-cache-dtype", "fp8_e5m2", "--max-model-len", "8192", gpus=2, sequences=8,
                   overhead=GiB)
    assert (fp8.kv_dtype_bytes, fp8.kv_bytes_per_token) == (1, per_token // 2)
    assert fp8.per_gpu_bytes == ceil_mib(-(-(weights + per_token // 2 * 8192 * 8) // 2) + GiB)
    assert estimate(model, "--kv-cache-dtype=auto").kv_dtype_bytes == 2


def test_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "llama-3.2-1b-q8_0.gguf"
    weights = llama_gguf(path)
    est = estimate(path, context=8192, sequences=2)
    assert est.format == "gguf" and est.weights_bytes == weights
    assert est.kv_bytes_per_token == 2 * 16 * 8 * 64 * 2
    assert est.per_gpu_bytes == ceil_mib(weights + 32768 * 8192 * 2 + 2 * GiB)
    assert estimate(path).context_from == "llama.context_length"


def test_a_hugging_face_id_is_found_in_the_cache_the_environment_names(tmp_path: Path) -> None:
    weights = 0

    def build(directory: Path) -> None:
        nonlocal weights
        weights = write_hf_model(directory, QWEN25_7B, shards=2)

    snap = hub_model(tmp_path / "hub", "Qwen/Qwen2.5-7B-Instruct", build)
    est = estimate("Qwen/Qwen2.5-7B-Instruct", environ={"HF_HOME": str(tmp_path)})
    assert est.source == str(snap) and est.weights_bytes == weights
    with pytest.raises(InvalidInput, match="it is not in the Hugging Face cache"):
        estimate("Qwen/Qwen2.5-7B-Instruct", environ={"HOME": str(tmp_path / "elsewhere")})
    # An interrupted download: the snapshot's link to a shard points at nothing.
    for blob in sorted((tmp_path / "hub" / "models--Qwen--Qwen2.5-7B-Instruct" / "blobs").iterdir()):
        if blob.stat().st_size > 10**9:
            blob.unlink()
            break
    with pytest.raises(InvalidInput, match="the shard the index names is missing"):
        estimate("Qwen/Qwen2.5-7B-Instruct", environ={"HF_HOME": str(tmp_path)})


def test_config_nesting_and_derived_head_dim(tmp_path: Path) -> None:
    vlm = {"model_type": "llava", "torch_dtype": "float32", "max_position_embeddings": 999,
           "text_config": {"num_hidden_layers": 4, "num_attention_heads": 8, "hidden_size": 1024,
                           "max_position_embeddings": 4096, "torch_dtype": None},
           "vision_config": {"num_hidden_layers": 24}}
    shape = shape_from_config(vlm, tmp_path / "config.json")
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.dtype_bytes, shape.context_tokens) == \
        (4, 8, 128, 4, 4096)  # KV heads = attention heads without GQA; dtype from the top level
    assert shape_from_config({**vlm, "torch_dtype": None, "dtype": "torch.bfloat16"}, tmp_path).dtype_bytes == 2
    assert shape_from_config({**vlm, "text_config": {**vlm["text_config"], "head_dim": 64}}, tmp_path).head_dim == 64


def _refusal(model: str | Path, *args: str, **kwargs: Any) -> str:
    with pytest.raises(InvalidInput) as caught:
        estimate(model, *args, **kwargs)
    message = caught.value.message
    assert message.startswith("Cannot compute --vram auto from ") and message.endswith("; pass --vram SIZE."), message
    return message


def test_refusals_name_the_path_and_what_is_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _refusal(empty) == f"Cannot compute --vram auto from {empty}: it has no config.json; pass --vram SIZE."
    (empty / "model-Q4_K_M.gguf").write_bytes(b"")
    assert "holds .gguf files but no config.json" in _refusal(empty)
    model = tmp_path / "m"
    for drop, expected in (("num_hidden_layers", "it has no num_hidden_layers"),
                           ("num_attention_heads", "it has no num_attention_heads")):
        write_config(model, {k: v for k, v in LLAMA31_8B.items() if k != drop})
        assert _refusal(model) == f"Cannot compute --vram auto from {model / 'config.json'}: {expected}; pass --vram SIZE."
    write_config(model, {**LLAMA31_8B, "head_dim": None, "hidden_size": None})
    assert "it has neither head_dim nor hidden_size" in _refusal(model)
    write_config(model, {**LLAMA31_8B, "num_key_value_heads": 0})
    assert "num_key_value_heads is 0, not a whole number above 0" in _refusal(model)
    write_config(model, LLAMA31_8B)
    assert "it holds no *.safetensors weights" in _refusal(model)
    write_safetensors(model / "model.safetensors", [("w", "BF16", (4, 4))])
    assert estimate(model).weights_bytes == 32
    write_config(model, {k: v for k, v in LLAMA31_8B.items() if k != "max_position_embeddings"})
    assert "it has no max_position_embeddings (give --context-tokens N)" in _refusal(model)
    assert estimate(model, context=100).context_tokens == 100
    write_config(model, {k: v for k, v in LLAMA31_8B.items() if k != "torch_dtype"})
    assert "it has no torch_dtype (or give --kv-cache-dtype)" in _refusal(model)
    assert estimate(model, "--kv-cache-dtype", "fp8").kv_dtype_bytes == 1
    write_config(model, {**LLAMA31_8B, "torch_dtype": "float8_e4m3fn"})
    assert "its torch_dtype 'float8_e4m3fn' is not float16, bfloat16 or float32" in _refusal(model)
    (model / "config.json").write_text("{")
    assert "config.json: it is not valid JSON" in _refusal(model)
    (model / "config.json").write_text(json.dumps([1]))
    assert "config.json: it is not a JSON object" in _refusal(model)
    missing = tmp_path / "nowhere"
    assert _refusal(missing) == f"Cannot compute --vram auto from {missing}: no such file or directory; pass --vram SIZE."
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    assert "it is neither a directory nor a regular file" in _refusal(fifo)  # never opened: it would block
    text = tmp_path / "weights.safetensors"
    write_safetensors(text, [("w", "F16", (2,))])
    assert "it is not a GGUF file" in _refusal(text)


def test_an_unreadable_model_is_a_refusal_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_path / "m", LLAMA31_8B)
    denied = str(tmp_path / "m" / "config.json")

    def unreadable(path: Path) -> None:  # what a directory without read permission gives a non-root daemon
        raise PermissionError(13, "Permission denied", denied)

    monkeypatch.setattr("gpud.estimate.model._read", unreadable)
    assert _refusal(tmp_path / "m") == f"Cannot compute --vram auto from {denied}: permission denied; pass --vram SIZE."


def test_engine_args_it_cannot_read_are_refused_before_any_file_is_opened(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert _refusal(missing, "--max-model-len", "-1") == (
        "Cannot compute --vram auto from the engine arg --max-model-len -1: it is not a number of tokens "
        "(use --context-tokens N to give one); pass --vram SIZE."
    )
    assert "--max-model-len: it has no value" in _refusal(missing, "--max-model-len")
    assert "--max-model-len: it has no value" in _refusal(missing, "--max-model-len", "--enforce-eager")
    # A --kv-cache-dtype gpud has no size for counts as the model's dtype (SPEC §11): on to the files.
    assert "nowhere: no such file or directory" in _refusal(missing, "--kv-cache-dtype", "int4")
    for text in ("auto", "0", "1.5", "12x", "2.5K", ""):
        with pytest.raises(InvalidInput):
            max_model_len(["--max-model-len", text])


def test_reading_engine_args() -> None:
    assert engine_arg(["--a", "1", "--max-model-len", "10"], "--max-model-len") == "10"
    assert engine_arg(["--max-model-lens", "10"], "--max-model-len") is None
    assert max_model_len([]) is None
    assert [max_model_len(["--max-model-len", v]) for v in ("32768", "32k", "32K", "25.6k", "1m", "1M")] == [
        32768, 32000, 32768, 25600, 10**6, 2**20]
    assert kv_cache_bytes(["--kv-cache-dtype", "fp8_e4m3"]) == ("fp8_e4m3", 1)
    assert kv_cache_bytes(["--kv-cache-dtype", "bfloat16"]) == ("bfloat16", 2)
    assert kv_cache_bytes(["--dtype", "float32"]) == ("auto", None)
    assert kv_cache_bytes(["--kv-cache-dtype", "float32"]) == ("float32", None)  # the model's dtype, as SPEC says
