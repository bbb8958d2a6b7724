"""GGUF headers (versions 2 and 3), read from the format's specification without touching tensor data.

Layout: magic `GGUF`, version (u32), tensor count and metadata count (u64), the metadata key/values
(typed, arrays included), the tensor infos (name, dims, ggml type, offset), then padding to
`general.alignment` (default 32) and the data. The file is memory-mapped and only the header pages are
touched, so a 70 GB model costs what its header costs (the tokenizer arrays are the bulk of it).

A tensor's size is its element count / the type's block size × the block's bytes (`GGML_TYPES`). A
model split into `NAME-00001-of-00003.gguf` files is read as one: the first file's metadata, every file's
tensors.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpud.estimate.hfconfig import ModelShape
from gpud.estimate.refusal import cannot_estimate

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ggml type id → (name, elements per block, bytes per block), per the ggml block structs.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# Metadata value type id → struct format of a scalar; 8 (string) and 9 (array) are read by hand.
_SCALARS: dict[int, str] = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class GgufArray:
    """A metadata array, kept as its element type and length only (its values are never needed here)."""

    item_type: int
    count: int


class _Truncated(Exception):
    """The header runs past the end of the file."""


@dataclass(frozen=True)
class GgufFile:
    """What a GGUF header declares. Metadata arrays (the tokenizer) are kept as their length only."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: int
    weights_bytes: int


class _Reader:
    """Sequential little- (or big-) endian reads over the mapped header."""

    def __init__(self, buf: mmap.mmap, order: str) -> None:
        self.buf = buf
        self.pos = 0
        self.order = order
        self.size = len(buf)
        self._structs: dict[str, struct.Struct] = {}

    def unpack(self, fmt: str) -> Any:
        packer = self._structs.get(fmt)
        if packer is None:
            packer = self._structs[fmt] = struct.Struct(self.order + fmt)
        if self.pos + packer.size > self.size:
            raise _Truncated
        (value,) = packer.unpack_from(self.buf, self.pos)
        self.pos += packer.size
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        if self.pos + length > self.size:
            raise _Truncated
        raw = self.buf[self.pos:self.pos + length]
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        # The tokenizer's arrays hold 100k+ strings; skipping them without decoding keeps a read fast.
        buf, pos, size = self.buf, self.pos, self.size
        if pos + 8 * count > size:  # each string takes 8 bytes at least: a garbage count fails at once
            raise _Truncated
        length = struct.Struct(self.order + "Q").unpack_from
        try:
            for _ in range(count):
                pos += 8 + length(buf, pos)[0]
        except struct.error:  # a length field past the end of the file
            raise _Truncated from None
        if pos > size:
            raise _Truncated
        self.pos = pos

    def value(self, kind: int, where: Path, key: str) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("I"), self.unpack("Q")
            if item in _SCALARS:
                width = struct.calcsize(_SCALARS[item])
                if self.pos + width * count > self.size:
                    raise _Truncated
                self.pos += width * count
            elif item == _STRING:
                self.skip_strings(count)
            elif item == _ARRAY:
                if self.pos + 12 * count > self.size:
                    raise _Truncated
                for _ in range(count):
                    self.value(_ARRAY, where, key)
            else:
                raise cannot_estimate(where, f"metadata key {key!r} holds an array of unknown type {item}")
            return GgufArray(item, count)
        raise cannot_estimate(where, f"metadata key {key!r} has an unknown value type {kind}")


def _byte_order(head: bytes, path: Path) -> str:
    if head[:4] != MAGIC:
        raise cannot_estimate(path, "it is not a GGUF file (its first bytes are not 'GGUF')")
    little, big = struct.unpack_from("<I", head, 4)[0], struct.unpack_from(">I", head, 4)[0]
    if little in (2, 3):
        return "<"
    if big in (2, 3):  # a big-endian file: the version gives it away
        return ">"
    version = little if little < 2**16 else big
    raise cannot_estimate(path, f"GGUF version {version} is not supported (gpud reads versions 2 and 3)")


def read_file(path: Path) -> GgufFile:
    """One GGUF file's header; InvalidInput (ending "pass --vram SIZE") when it is not GGUF, is truncated,
    or its tensors do not fit the file."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                head = fh.read(24)
                if head[:4] != MAGIC:
                    raise cannot_estimate(path, "it is not a GGUF file (its first bytes are not 'GGUF')")
                raise cannot_estimate(path, f"the file is {size} bytes, too short for a GGUF header")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf, size)
    except OSError as exc:
        raise cannot_estimate(path, f"the file cannot be read ({exc.strerror or exc})") from None


def _parse(path: Path, buf: mmap.mmap, size: int) -> GgufFile:
    reader = _Reader(buf, _byte_order(bytes(buf[:8]), path))
    reader.pos = 4
    try:
        version = reader.unpack("I")
        tensor_count, kv_count = reader.unpack("Q"), reader.unpack("Q")
        # A key/value takes 13 bytes at least and a tensor info 24: counts past that are not a header.
        if 24 + 13 * kv_count + 24 * tensor_count > size:
            raise _Truncated
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = reader.string()
            metadata[key] = reader.value(reader.unpack("I"), path, key)
        infos: list[tuple[str, list[int], int, int]] = []
        for _ in range(tensor_count):
            name = reader.string()
            dims = [reader.unpack("Q") for _ in range(reader.unpack("I"))]
            infos.append((name, dims, reader.unpack("I"), reader.unpack("Q")))
    except _Truncated:
        raise cannot_estimate(path, "the GGUF header is truncated (it runs past the end of the file)") from None
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0:
        raise cannot_estimate(path, f"general.alignment {alignment!r} is not a positive whole number")
    data_start = reader.pos + (alignment - reader.pos % alignment) % alignment
    data_size = size - data_start
    spans: list[tuple[int, int, str]] = []
    for name, dims, type_id, offset in infos:
        known = GGML_TYPES.get(type_id)
        if known is None:
            raise cannot_estimate(path, f"tensor {name!r} has ggml type {type_id}, which gpud does not know")
        type_name, block, block_bytes = known
        elements = 1
        for dim in dims:
            elements *= dim
        if elements % block:
            raise cannot_estimate(path, f"tensor {name!r} of {type_name} has {elements} elements, not a whole "
                                        f"number of {block}-element blocks")
        nbytes = elements // block * block_bytes
        if offset % alignment:
            raise cannot_estimate(path, f"the header's offsets do not add up: tensor {name!r} starts at {offset}, "
                                        f"not a multiple of the alignment {alignment}")
        if offset + nbytes > data_size:
            raise cannot_estimate(path, f"the header's offsets do not add up: tensor {name!r} ends at byte "
                                        f"{data_start + offset + nbytes} but the file has {size} (truncated?)")
        spans.append((offset, offset + nbytes, name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin < end:
            raise cannot_estimate(path, f"the header's offsets do not add up: tensor {name!r} overlaps the one "
                                        "before it")
        end = stop
    return GgufFile(path=path, version=version, metadata=metadata, tensors=len(infos),
                    weights_bytes=sum(stop - begin for begin, stop, _ in spans))


def split_paths(path: Path) -> list[Path]:
    """Every file of a split model (`NAME-0000K-of-0000N.gguf`) given any one of them; else just `path`."""
    match = _SPLIT_NAME.match(path.name)
    if not match or int(match["count"]) <= 1:
        return [path]
    count = int(match["count"])
    paths = [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    for part in paths:
        if not part.exists():
            raise cannot_estimate(part, f"this part of the {count}-file split model is missing")
    return paths


def read_model(path: Path) -> GgufFile:
    """A GGUF model, split or not: the first file's metadata, the tensors of every file."""
    parts = [read_file(p) for p in split_paths(path)]
    first = parts[0]
    count = first.metadata.get("split.count")
    if isinstance(count, int) and not isinstance(count, bool) and count > len(parts):
        # Renamed parts of a split model: the other files cannot be found, and one part alone under-counts.
        raise cannot_estimate(path, f"its header says it is one of {count} files of a split model, but they are "
                                    f"not named like NAME-00001-of-{count:05d}.gguf beside it")
    return GgufFile(path=path, version=first.version, metadata=first.metadata,
                    tensors=sum(p.tensors for p in parts), weights_bytes=sum(p.weights_bytes for p in parts))


def _count(metadata: dict[str, Any], key: str, where: Path) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, GgufArray):
        raise cannot_estimate(where, f"{key} holds one value per layer, which the estimate does not read")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise cannot_estimate(where, f"{key} is {value!r}, not a whole number above 0")
    return value


def shape_from_gguf(model: GgufFile) -> ModelShape:
    """The attention shape from `ARCH.*` metadata (SPEC §11); the cache is f16, as llama.cpp keeps it."""
    where, meta = model.path, model.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise cannot_estimate(where, "it has no general.architecture")

    def required(key: str) -> int:
        value = _count(meta, f"{arch}.{key}", where)
        if value is None:
            raise cannot_estimate(where, f"it has no {arch}.{key}")
        return value

    layers = required("block_count")
    heads = required("attention.head_count")
    kv_heads = _count(meta, f"{arch}.attention.head_count_kv", where) or heads
    head_dim = _count(meta, f"{arch}.attention.key_length", where)
    if head_dim is None:
        embedding = required("embedding_length")
        if embedding % heads:
            raise cannot_estimate(where, f"{arch}.embedding_length {embedding} is not a multiple of "
                                         f"{arch}.attention.head_count {heads}")
        head_dim = embedding // heads
    return ModelShape(where=where, layers=layers, kv_heads=kv_heads, head_dim=head_dim, dtype="f16",
                      dtype_bytes=2, context_tokens=_count(meta, f"{arch}.context_length", where),
                      context_key=f"{arch}.context_length")
