"""safetensors headers, read and checked without touching the tensor data.

A file is an 8-byte little-endian header length N, N bytes of JSON (tensor name → dtype, shape and
`data_offsets` [begin, end) relative to the end of the header, plus an optional `__metadata__` table),
then the data. Only the first 8 + N bytes are read, so a 20 GB shard costs one small read; the data's
length comes from the file's size.

A header is trusted only when its numbers agree: every tensor's byte span is exactly dtype size × the
product of its shape, the spans tile the data section from 0 with no gap and no overlap, and the file is
exactly as long as the last span says (what the safetensors library itself demands before it loads).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpud.estimate.refusal import cannot_estimate

# Bits per element of every dtype the format defines; the sub-byte ones must fill whole bytes per tensor.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
# The safetensors library refuses larger headers; a bigger "length" means the file is something else.
MAX_HEADER_BYTES = 100 * 2**20
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class SafetensorsFile:
    """What one file's header declares."""

    path: Path
    tensors: int
    weights_bytes: int  # Σ dtype size × Π shape over its tensors


def _shape_elements(shape: Any) -> int | None:
    if not isinstance(shape, list):
        return None
    count = 1
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            return None
        count *= dim
    return count


def read_header(path: Path) -> SafetensorsFile:
    """The tensors one safetensors file declares; InvalidInput (ending "pass --vram SIZE") when the header
    is truncated, is not JSON, or its offsets do not add up."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise cannot_estimate(path, f"the file is {size} bytes, too short for a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise cannot_estimate(path, f"the header length {length} is past {MAX_HEADER_BYTES} bytes "
                                            "(not a safetensors file?)")
            raw = fh.read(length)
    except OSError as exc:
        raise cannot_estimate(path, f"the file cannot be read ({exc.strerror or exc})") from None
    if len(raw) < length:
        raise cannot_estimate(path, f"the header is truncated ({len(raw)} of {length} bytes)")
    try:
        header = json.loads(raw)
    except ValueError:  # UnicodeDecodeError is a ValueError too
        raise cannot_estimate(path, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise cannot_estimate(path, "the header is not a JSON object")
    spans: list[tuple[int, int, str]] = []
    weights = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise cannot_estimate(path, f"tensor {name!r} is not an object in the header")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        bits = DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
        if bits is None:
            raise cannot_estimate(path, f"tensor {name!r} has an unknown dtype {dtype!r}")
        elements = _shape_elements(shape)
        if elements is None:
            raise cannot_estimate(path, f"tensor {name!r} has no valid shape")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise cannot_estimate(path, f"tensor {name!r} has no valid data_offsets")
        if elements * bits % 8:
            raise cannot_estimate(path, f"tensor {name!r} of {dtype} does not fill whole bytes")
        nbytes = elements * bits // 8
        if offsets[1] - offsets[0] != nbytes:
            raise cannot_estimate(path, f"the header's offsets do not add up: tensor {name!r} spans "
                                        f"{offsets[1] - offsets[0]} bytes, but {dtype} × {shape} is {nbytes}")
        spans.append((offsets[0], offsets[1], name))
        weights += nbytes
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            gap = "a gap" if begin > end else "an overlap"
            raise cannot_estimate(path, f"the header's offsets do not add up: {gap} before tensor {name!r} "
                                        f"at byte {begin}")
        end = stop
    data = size - 8 - length
    if data != end:
        raise cannot_estimate(path, f"the header's offsets do not add up: its tensors take {end} bytes but "
                                    f"the file holds {data} bytes of data"
                                    + (" (truncated?)" if data < end else ""))
    return SafetensorsFile(path=path, tensors=len(spans), weights_bytes=weights)


def shard_paths(directory: Path) -> list[Path]:
    """The weight files of a model directory: those `model.safetensors.index.json` maps tensors to, else
    every `*.safetensors` file in it. InvalidInput when there are none or a mapped shard is missing."""
    index = directory / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_bytes()).get("weight_map")
        except (OSError, ValueError, AttributeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise cannot_estimate(index, "it is not valid JSON with a weight_map of tensor → file")
        names = sorted(set(weight_map.values()))
        for name in names:
            if "/" in name or name in ("", ".", ".."):
                raise cannot_estimate(index, f"its weight_map names {name!r}, which is not a file beside it")
            if not (directory / name).is_file():
                raise cannot_estimate(directory / name, "the shard the index names is missing (an incomplete "
                                                        "download?)")
        return [directory / name for name in names]
    found = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if not found:
        others = "; it has only PyTorch .bin weights, whose sizes cannot be read without loading them" \
            if any(directory.glob("*.bin")) else ""
        raise cannot_estimate(directory, f"it holds no *.safetensors weights{others}")
    return found


def read_weights(directory: Path) -> tuple[int, int]:
    """(weights_bytes, number of files) of a model directory's safetensors weights, sharded or not."""
    files = [read_header(path) for path in shard_paths(directory)]
    return sum(f.weights_bytes for f in files), len(files)
