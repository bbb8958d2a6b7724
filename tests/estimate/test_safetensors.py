"""safetensors headers: exact byte counts from dtype × shape, sharded or not, and every way a header can lie."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from modelfiles import GiB, tensor_bytes, write_safetensors, write_sharded

from gpud.errors import InvalidInput
from gpud.estimate.safetensors import read_header, read_weights, shard_paths


def test_exact_bytes_for_every_dtype_width(tmp_path: Path) -> None:
    tensors = [("a", "BF16", (3, 5)), ("b", "F32", (7,)), ("c", "F8_E4M3", (9, 2)), ("d", "I64", (1,)),
               ("e", "F4", (4, 6)), ("f", "BOOL", (3,)), ("g", "F64", ()), ("h", "U16", (0, 4))]
    path = tmp_path / "model.safetensors"
    write_safetensors(path, tensors, metadata={"format": "pt"})
    found = read_header(path)
    assert found.weights_bytes == 3 * 5 * 2 + 7 * 4 + 18 + 8 + 12 + 3 + 8 + 0
    assert found.tensors == len(tensors)


def test_a_20_gb_tensor_is_read_from_its_header_alone(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    write_safetensors(path, [("w", "BF16", (100_000, 100_000))])  # 20 GB, a hole on disk
    assert path.stat().st_size > 20 * 10**9 and path.stat().st_blocks * 512 < 10 * 2**20
    assert read_header(path).weights_bytes == 20 * 10**9


def test_sharded_with_index_and_without(tmp_path: Path) -> None:
    tensors = [(f"t{i}", "BF16", (1024, 1024 + i)) for i in range(10)]
    total = sum(tensor_bytes(d, s) for _, d, s in tensors)
    assert write_sharded(tmp_path / "indexed", tensors, 4) == total
    assert read_weights(tmp_path / "indexed") == (total, 4)
    # A stray file the index does not name is not part of the model.
    write_safetensors(tmp_path / "indexed" / "extra.safetensors", [("x", "F32", (GiB,))])
    assert read_weights(tmp_path / "indexed") == (total, 4)
    write_sharded(tmp_path / "globbed", tensors, 3, index=False)
    assert read_weights(tmp_path / "globbed") == (total, 3)


def _raw(path: Path, header: bytes, data: int, length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header)
    with open(path, "r+b") as fh:
        fh.truncate(8 + len(header) + data)
    return path


def _refusal(path: Path) -> str:
    with pytest.raises(InvalidInput) as caught:
        read_header(path)
    message = caught.value.message
    assert message.startswith(f"Cannot compute --vram auto from {path}: ") and message.endswith("; pass --vram SIZE.")
    return message


def test_broken_headers_are_one_sentence_naming_the_file(tmp_path: Path) -> None:
    entry = {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}
    cases = {
        "short": (b"abc", None, "too short"),
        "huge": (b"{}", 2**40, "past"),
        "cut": (b'{"a": {"dtype"', None, "not valid JSON"),
        "list": (b"[1, 2]", None, "not a JSON object"),
        "utf": (b'{"\xff": 1}', None, "not valid JSON"),
    }
    for name, (header, length, expected) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        if name == "short":
            path.write_bytes(header)
        else:
            _raw(path, header, 0, length)
        assert expected in _refusal(path), name
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(struct.pack("<Q", 100) + b'{"a": 1}')
    assert "header is truncated (8 of 100 bytes)" in _refusal(truncated)

    def header_of(entries: dict[str, object]) -> bytes:
        return json.dumps(entries).encode()

    bad = {
        "dtype": ({"a": {**entry, "dtype": "Q4"}}, 8, "unknown dtype 'Q4'"),
        "shape": ({"a": {**entry, "shape": [-1]}}, 8, "no valid shape"),
        "offsets": ({"a": {**entry, "data_offsets": [8, 0]}}, 8, "no valid data_offsets"),
        "span": ({"a": {**entry, "data_offsets": [0, 6]}}, 6, "spans 6 bytes, but F16 × [4] is 8"),
        "gap": ({"a": entry, "b": {**entry, "data_offsets": [10, 18]}}, 18, "a gap before tensor 'b'"),
        "overlap": ({"a": entry, "b": {**entry, "data_offsets": [4, 12]}}, 12, "an overlap before tensor"),
        "cut-data": ({"a": entry}, 5, "take 8 bytes but the file holds 5 bytes of data (truncated?)"),
        "extra-data": ({"a": entry}, 9, "take 8 bytes but the file holds 9 bytes"),
        "entry": ({"a": [1]}, 0, "not an object"),
        "half-byte": ({"a": {**entry, "dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}, 1, "whole bytes"),
    }
    for name, (entries, data, expected) in bad.items():
        message = _refusal(_raw(tmp_path / f"{name}.safetensors", header_of(entries), data))
        assert expected in message, (name, message)
        adds_up = name not in ("span", "gap", "overlap", "cut-data", "extra-data")
        assert ("the header's offsets do not add up" not in message) == adds_up, (name, message)


def test_an_unreadable_file_is_a_refusal(tmp_path: Path) -> None:
    assert "cannot be read" in _refusal(tmp_path / "missing.safetensors")


def test_model_directories_without_safetensors_weights(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInput, match=r"from .*/empty: it holds no \*\.safetensors weights; pass"):
        shard_paths(empty)
    (empty / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(InvalidInput, match="only PyTorch .bin weights"):
        shard_paths(empty)
    indexed = tmp_path / "indexed"
    write_sharded(indexed, [("a", "F16", (4,)), ("b", "F16", (4,))], 2)
    (indexed / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InvalidInput, match="model-00002-of-00002.safetensors: the shard the index names is missing"):
        shard_paths(indexed)
    (indexed / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="model.safetensors.index.json: it is not valid JSON with a weight_map"):
        shard_paths(indexed)
    (indexed / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../elsewhere"}}))
    with pytest.raises(InvalidInput, match="not a file beside it"):
        shard_paths(indexed)
