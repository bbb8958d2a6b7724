"""Model files on disk for the `--vram auto` tests and benchmark: safetensors and GGUF headers written from
the formats' specifications, with the tensor data left as a hole (the files are sparse: a 20 GB tensor
costs no disk), config.json files, transformer layouts from a config, and a fake Hugging Face hub cache.

Importable as `modelfiles` (tests/ is on the path); bench/estimate_bench.py imports it too.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

GiB = 2**30
MiB = 2**20

# safetensors dtype → bits per element (the reader's table is the thing under test: this one is separate).
ST_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "I16": 16, "U16": 16, "F16": 16,
           "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "F4": 4}

Tensor = tuple[str, str, Sequence[int]]  # name, dtype, shape


def tensor_bytes(dtype: str, shape: Sequence[int]) -> int:
    return math.prod(shape) * ST_BITS[dtype] // 8


def write_safetensors(path: Path, tensors: Iterable[Tensor], *, metadata: Mapping[str, str] | None = None,
                      header: Any = None, pad_to: int = 8) -> int:
    """A safetensors file with these tensors, contiguous from offset 0; returns their bytes. The data is
    a hole. `header` replaces the generated JSON object (to write broken ones)."""
    entries: dict[str, Any] = {}
    if metadata is not None:
        entries["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in tensors:
        size = tensor_bytes(dtype, shape)
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries if header is None else header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % pad_to)  # the reference writer pads the header with spaces
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.truncate(8 + len(raw) + offset)
    return offset


def write_sharded(directory: Path, tensors: Sequence[Tensor], shards: int, *, index: bool = True) -> int:
    """The tensors split over `shards` files `model-0000K-of-0000N.safetensors` (+ the index); their bytes."""
    per = -(-len(tensors) // shards)
    total = 0
    weight_map: dict[str, str] = {}
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = tensors[k * per:(k + 1) * per]
        total += write_safetensors(directory / name, part)
        weight_map.update({t[0]: name for t in part})
    if index:
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def write_config(directory: Path, config: Mapping[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def transformer_tensors(config: Mapping[str, Any], dtype: str = "BF16") -> list[Tensor]:
    """The tensors of a Llama/Qwen/Mixtral-style decoder as its config describes it (the layout the
    Hugging Face checkpoints use), so that a config and its header sizes can be written by hand."""
    c = dict(config.get("text_config") or {}) or dict(config)
    hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or hidden // heads
    inter = c["intermediate_size"]
    experts = c.get("num_local_experts", 0)
    bias = bool(c.get("attention_bias") or c.get("model_type") == "qwen2")
    out: list[Tensor] = [("model.embed_tokens.weight", dtype, (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", dtype, (hidden,)),
            (p + "post_attention_layernorm.weight", dtype, (hidden,)),
            (p + "self_attn.q_proj.weight", dtype, (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", dtype, (kv * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", dtype, (kv * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", dtype, (hidden, heads * head_dim)),
        ]
        if bias:
            out += [(p + "self_attn.q_proj.bias", dtype, (heads * head_dim,)),
                    (p + "self_attn.k_proj.bias", dtype, (kv * head_dim,)),
                    (p + "self_attn.v_proj.bias", dtype, (kv * head_dim,))]
        if experts:
            out.append((p + "block_sparse_moe.gate.weight", dtype, (experts, hidden)))
            for e in range(experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                out += [(q + "w1.weight", dtype, (inter, hidden)), (q + "w2.weight", dtype, (hidden, inter)),
                        (q + "w3.weight", dtype, (inter, hidden))]
        else:
            out += [(p + "mlp.gate_proj.weight", dtype, (inter, hidden)),
                    (p + "mlp.up_proj.weight", dtype, (inter, hidden)),
                    (p + "mlp.down_proj.weight", dtype, (hidden, inter))]
    out.append(("model.norm.weight", dtype, (hidden,)))
    if not c.get("tie_word_embeddings", config.get("tie_word_embeddings", False)):
        out.append(("lm_head.weight", dtype, (vocab, hidden)))
    return out


def write_hf_model(directory: Path, config: Mapping[str, Any], shards: int = 1, dtype: str = "BF16") -> int:
    """config.json and its weights (sharded when shards > 1); returns the weights' bytes."""
    write_config(directory, config)
    tensors = transformer_tensors(config, dtype)
    if shards == 1:
        return write_safetensors(directory / "model.safetensors", tensors)
    return write_sharded(directory, tensors, shards)


# ---- GGUF ----------------------------------------------------------------------------------------------

# ggml type id → (elements per block, bytes per block), again independent of the reader's table.
GGML = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34),
        "Q4_K": (12, 256, 144), "Q6_K": (14, 256, 210), "IQ4_XS": (23, 256, 136), "BF16": (30, 1, 2),
        "MXFP4": (39, 32, 17)}
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q",
        F64: "d"}

Kv = tuple[str, int, Any]  # key, value type, value (for ARRAY: (item type, [values]))
GgufTensor = tuple[str, Sequence[int], str]  # name, dims (fastest first), ggml type name


def ggml_bytes(type_name: str, dims: Sequence[int]) -> int:
    _, block, size = GGML[type_name]
    return math.prod(dims) // block * size


def _value(kind: int, value: Any, order: str) -> bytes:
    if kind == STRING:
        raw = value.encode()
        return struct.pack(order + "Q", len(raw)) + raw
    if kind == ARRAY:
        item, values = value
        return struct.pack(order + "IQ", item, len(values)) + b"".join(_value(item, v, order) for v in values)
    return struct.pack(order + _FMT[kind], value)


MAGIC_GGUF = b"GGUF"


def write_gguf(path: Path, kvs: Sequence[Kv], tensors: Sequence[GgufTensor], *, alignment: int = 32,
               version: int = 3, order: str = "<", truncate_at: int | None = None,
               offsets: Sequence[int] | None = None) -> int:
    """A GGUF file: header, metadata, tensor infos, padding, then the data as a hole. Returns the tensors'
    bytes. `offsets` overrides the computed (aligned, contiguous) data offsets, to write broken files."""
    body = bytearray(MAGIC_GGUF)
    body += struct.pack(order + "IQQ", version, len(tensors), len(kvs))
    for key, kind, value in kvs:
        body += _value(STRING, key, order) + struct.pack(order + "I", kind) + _value(kind, value, order)
    offset, placed = 0, []
    for _name, dims, type_name in tensors:
        placed.append(offset)
        offset += ggml_bytes(type_name, dims)
        offset += -offset % alignment
    if offsets is not None:
        placed = list(offsets)
    end = 0
    for (name, dims, type_name), at in zip(tensors, placed, strict=True):
        body += _value(STRING, name, order) + struct.pack(order + "I", len(dims))
        body += b"".join(struct.pack(order + "Q", d) for d in dims)
        body += struct.pack(order + "IQ", GGML[type_name][0], at)
        end = max(end, at + ggml_bytes(type_name, dims))
    body += b"\0" * (-len(body) % alignment)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(body)
        fh.truncate(len(body) + end if truncate_at is None else truncate_at)
    return sum(ggml_bytes(t, d) for _, d, t in tensors)


def llama_gguf(path: Path, *, layers: int = 16, hidden: int = 2048, heads: int = 32, kv_heads: int = 8,
               ffn: int = 8192, vocab: int = 128256, context: int = 131072, weights: str = "Q8_0",
               extra_kvs: Sequence[Kv] = (), vocab_strings: int = 1000, merges: int = 0, **kwargs: Any) -> int:
    """A llama-architecture GGUF like llama.cpp's converter writes (Llama 3.2 1B by default, tied
    embeddings, f32 norms); `vocab_strings` tokens and `merges` BPE merges in the tokenizer arrays (the bulk
    of a real header: 128256 and 280147 for Llama 3). Returns the tensors' bytes."""
    kvs: list[Kv] = [
        ("general.architecture", STRING, "llama"),
        ("general.name", STRING, "Llama 3.2 1B Instruct"),
        ("llama.block_count", U32, layers),
        ("llama.context_length", U32, context),
        ("llama.embedding_length", U32, hidden),
        ("llama.feed_forward_length", U32, ffn),
        ("llama.attention.head_count", U32, heads),
        ("llama.attention.head_count_kv", U32, kv_heads),
        ("llama.rope.freq_base", F32, 500000.0),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("general.file_type", U32, 7),
        ("tokenizer.ggml.model", STRING, "gpt2"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, [f"tok{i}" for i in range(vocab_strings)])),
        ("tokenizer.ggml.token_type", ARRAY, (I32, [1] * vocab_strings)),
        ("tokenizer.ggml.merges", ARRAY, (STRING, [f"m {i}" for i in range(merges)])),
        ("tokenizer.ggml.bos_token_id", U32, 128000),
        ("general.quantization_version", U32, 2),
        *extra_kvs,
    ]
    head_dim = hidden // heads
    tensors: list[GgufTensor] = [("rope_freqs.weight", (head_dim // 2,), "F32"),
                                 ("token_embd.weight", (hidden, vocab), weights)]
    for i in range(layers):
        p = f"blk.{i}."
        tensors += [
            (p + "attn_norm.weight", (hidden,), "F32"),
            (p + "attn_q.weight", (hidden, heads * head_dim), weights),
            (p + "attn_k.weight", (hidden, kv_heads * head_dim), weights),
            (p + "attn_v.weight", (hidden, kv_heads * head_dim), weights),
            (p + "attn_output.weight", (heads * head_dim, hidden), weights),
            (p + "ffn_norm.weight", (hidden,), "F32"),
            (p + "ffn_gate.weight", (hidden, ffn), weights),
            (p + "ffn_up.weight", (hidden, ffn), weights),
            (p + "ffn_down.weight", (ffn, hidden), weights),
        ]
    tensors.append(("output_norm.weight", (hidden,), "F32"))
    return write_gguf(path, kvs, tensors, **kwargs)


# ---- the Hugging Face hub cache ------------------------------------------------------------------------


def hub_model(cache: Path, model_id: str, build: Any, *, commit: str = "0123456789abcdef0123456789abcdef01234567",
              ref: str | None = "main") -> Path:
    """`cache/models--ORG--NAME/` as huggingface_hub leaves it: the files in blobs/, the snapshot's entries
    symlinks to them, refs/REF naming the commit. `build(directory)` writes the model's files. Returns the
    snapshot directory."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    staging = repo / ".staging"
    build(staging)
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for i, file in enumerate(sorted(staging.iterdir())):
        blob = repo / "blobs" / f"{commit[:8]}{i:04d}"
        os.replace(file, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    staging.rmdir()
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


# ---- configs of real models, from their public model cards (config.json) -------------------------------

QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "head_dim": 128, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
LLAMA31_70B = {**LLAMA31_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
               "num_hidden_layers": 80}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
