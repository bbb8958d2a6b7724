"""GGUF headers: metadata, tensor sizes for several ggml types, split models, and broken files."""

from __future__ import annotations

from pathlib import Path

import pytest
from modelfiles import (
    ARRAY,
    F32,
    GGML,
    STRING,
    U32,
    U64,
    ggml_bytes,
    llama_gguf,
    write_gguf,
)

from gpud.errors import InvalidInput
from gpud.estimate.gguf import GGML_TYPES, GgufArray, read_file, read_model, shape_from_gguf

ARCH = [("general.architecture", STRING, "llama")]


def test_tensor_sizes_for_several_ggml_types(tmp_path: Path) -> None:
    tensors = [(f"t.{name}", (256, 3), name) for name in GGML]
    path = tmp_path / "mixed.gguf"
    total = write_gguf(path, [*ARCH, ("general.alignment", U32, 64)], tensors, alignment=64)
    model = read_file(path)
    assert model.weights_bytes == total == sum(ggml_bytes(t, d) for _, d, t in tensors)
    assert model.tensors == len(tensors) and model.version == 3
    assert model.weights_bytes == 768 * (4 + 2 + 2) + 24 * (18 + 24 + 34 + 17) + 3 * (144 + 210 + 136)
    for name, (type_id, block, size) in GGML.items():
        assert GGML_TYPES[type_id] == (name, block, size)


def test_llama_1b_q8_0_metadata_and_shape(tmp_path: Path) -> None:
    path = tmp_path / "llama-3.2-1b-q8_0.gguf"
    total = llama_gguf(path, vocab_strings=20_000)
    model = read_model(path)
    assert model.weights_bytes == total
    assert model.metadata["llama.block_count"] == 16 and model.metadata["general.name"] == "Llama 3.2 1B Instruct"
    assert model.metadata["tokenizer.ggml.tokens"] == GgufArray(STRING, 20_000)
    shape = shape_from_gguf(model)
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.dtype_bytes) == (16, 8, 64, 2)
    assert (shape.context_tokens, shape.context_key) == (131072, "llama.context_length")


def test_version_2_and_big_endian_files(tmp_path: Path) -> None:
    for version, order in ((2, "<"), (3, ">")):
        path = tmp_path / f"v{version}{order}.gguf"
        total = llama_gguf(path, layers=2, version=version, order=order)
        assert read_model(path).weights_bytes == total
        assert read_model(path).metadata["llama.context_length"] == 131072


def test_a_split_model_is_read_as_one(tmp_path: Path) -> None:
    parts = []
    for k in (1, 2, 3):
        kvs = [*ARCH, ("split.no", U32, k - 1), ("split.count", U32, 3)] if k == 1 else [("split.no", U32, k - 1)]
        parts.append(write_gguf(tmp_path / f"m-{k:05d}-of-00003.gguf", kvs, [(f"w{k}", (32, 100 * k), "Q8_0")]))
    for k in (1, 3):
        model = read_model(tmp_path / f"m-{k:05d}-of-00003.gguf")
        assert model.weights_bytes == sum(parts) and model.tensors == 3
    renamed = tmp_path / "renamed.gguf"
    (tmp_path / "m-00001-of-00003.gguf").rename(renamed)
    with pytest.raises(InvalidInput, match="one of 3 files of a split model, but they are not named like"):
        read_model(renamed)
    renamed.rename(tmp_path / "m-00001-of-00003.gguf")
    (tmp_path / "m-00002-of-00003.gguf").unlink()
    with pytest.raises(InvalidInput, match="m-00002-of-00003.gguf: this part of the 3-file split model is missing"):
        read_model(tmp_path / "m-00001-of-00003.gguf")


def test_shape_fallbacks_and_missing_keys(tmp_path: Path) -> None:
    def shape(kvs: list[tuple[str, int, object]]) -> tuple[int, int, int, int | None]:
        path = tmp_path / "s.gguf"
        write_gguf(path, kvs, [("w", (32,), "F32")])
        found = shape_from_gguf(read_model(path))
        return found.layers, found.kv_heads, found.head_dim, found.context_tokens

    base = [*ARCH, ("llama.block_count", U64, 4), ("llama.attention.head_count", U32, 8),
            ("llama.embedding_length", U32, 512)]
    assert shape(base) == (4, 8, 64, None)  # no head_count_kv: every head has its own KV; no context
    assert shape([*base, ("llama.attention.key_length", U32, 96), ("llama.attention.head_count_kv", U32, 2)]) \
        == (4, 2, 96, None)
    for kvs, expected in [
        (base[1:], "it has no general.architecture"),
        (base[:1] + base[2:], "it has no llama.block_count"),
        (base[:3], "it has no llama.embedding_length"),
        ([*base, ("llama.attention.head_count_kv", ARRAY, (U32, [8, 8, 0, 0]))], "holds one value per layer"),
        ([*base[:3], ("llama.embedding_length", U32, 100)], "100 is not a multiple of llama.attention.head_count 8"),
        ([*base, ("llama.context_length", F32, 1.5)], "llama.context_length is 1.5, not a whole number"),
    ]:
        with pytest.raises(InvalidInput, match=expected):
            shape(kvs)


def _refusal(path: Path) -> str:
    with pytest.raises(InvalidInput) as caught:
        read_model(path)
    message = caught.value.message
    assert message.startswith(f"Cannot compute --vram auto from {path}: ") and message.endswith("; pass --vram SIZE.")
    return message


def test_broken_files(tmp_path: Path) -> None:
    (tmp_path / "text.gguf").write_text("hello, this is not a model file at all")
    assert "it is not a GGUF file" in _refusal(tmp_path / "text.gguf")
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF\x03")
    assert "too short for a GGUF header" in _refusal(tmp_path / "tiny.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert "it is not a GGUF file" in _refusal(tmp_path / "empty.gguf")
    write_gguf(tmp_path / "v1.gguf", ARCH, [], version=1)
    assert "GGUF version 1 is not supported" in _refusal(tmp_path / "v1.gguf")
    llama_gguf(tmp_path / "cut.gguf", layers=1, truncate_at=2000)
    assert "the GGUF header is truncated" in _refusal(tmp_path / "cut.gguf")
    llama_gguf(tmp_path / "short.gguf", layers=2, truncate_at=100_000)
    assert "ends at byte" in _refusal(tmp_path / "short.gguf") and "(truncated?)" in _refusal(tmp_path / "short.gguf")
    write_gguf(tmp_path / "odd.gguf", ARCH, [("w", (33,), "Q8_0")])
    assert "33 elements, not a whole number of 32-element blocks" in _refusal(tmp_path / "odd.gguf")
    write_gguf(tmp_path / "misaligned.gguf", ARCH, [("w", (32,), "F32")], offsets=[4])
    assert "starts at 4, not a multiple of the alignment 32" in _refusal(tmp_path / "misaligned.gguf")
    write_gguf(tmp_path / "overlap.gguf", ARCH, [("a", (64,), "F32"), ("b", (64,), "F32")], offsets=[0, 128])
    assert "tensor 'b' overlaps the one before it" in _refusal(tmp_path / "overlap.gguf")
    write_gguf(tmp_path / "align.gguf", [*ARCH, ("general.alignment", U32, 0)], [])
    assert "general.alignment 0 is not a positive whole number" in _refusal(tmp_path / "align.gguf")
    path = tmp_path / "type.gguf"
    write_gguf(path, ARCH, [("w", (32,), "F32")])
    raw = bytearray(path.read_bytes())
    at = raw.index((1).to_bytes(8, "little") + b"w") + 9 + 4 + 8  # name "w", then n_dims and one dim: its type
    raw[at:at + 4] = (77).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    assert "ggml type 77, which gpud does not know" in _refusal(path)
    # A count far past what the file could hold is garbage, found at once rather than by reading on.
    garbage = tmp_path / "count.gguf"
    garbage.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**60).to_bytes(8, "little") + bytes(8 + 64))
    assert "the GGUF header is truncated" in _refusal(garbage)
