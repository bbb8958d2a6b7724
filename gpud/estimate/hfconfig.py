"""A model's attention shape from its Hugging Face `config.json`, the numbers the KV-cache term needs.

Multimodal configs nest the language model under `text_config`; each field is read there first and
falls back to the top level when the nested table lacks it (`torch_dtype` often sits only at the top).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpud.estimate.refusal import cannot_estimate

CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class ModelShape:
    """What the KV term reads from a model, whatever file it came from."""

    where: Path  # the file the numbers came from, for messages
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str | None  # the weights' dtype as the file names it (torch_dtype); None when it names none
    dtype_bytes: int | None  # its size per element; None when unknown
    context_tokens: int | None  # the trained context (max_position_embeddings), None when absent
    context_key: str  # where context_tokens comes from, for people ("max_position_embeddings")


# torch dtype names (with and without the "torch." prefix some configs carry) → bytes per element.
DTYPE_BYTES: dict[str, int] = {"float16": 2, "half": 2, "bfloat16": 2, "float32": 4, "float": 4}


def dtype_bytes(name: str | None) -> int | None:
    if name is None:
        return None
    return DTYPE_BYTES.get(name.removeprefix("torch."))


def _field(config: dict[str, Any], name: str) -> Any:
    nested = config.get("text_config")
    if isinstance(nested, dict) and nested.get(name) is not None:
        return nested[name]
    return config.get(name)


def _positive(config: dict[str, Any], name: str, where: Path) -> int | None:
    value = _field(config, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise cannot_estimate(where, f"{name} is {value!r}, not a whole number above 0")
    return value


def _required(config: dict[str, Any], name: str, where: Path) -> int:
    value = _positive(config, name, where)
    if value is None:
        raise cannot_estimate(where, f"it has no {name}")
    return value


def shape_from_config(config: dict[str, Any], where: Path) -> ModelShape:
    """The shape of a parsed config.json (SPEC §11 fields); InvalidInput naming the first missing field."""
    layers = _required(config, "num_hidden_layers", where)
    heads = _required(config, "num_attention_heads", where)
    kv_heads = _positive(config, "num_key_value_heads", where) or heads
    head_dim = _positive(config, "head_dim", where)
    if head_dim is None:
        hidden = _positive(config, "hidden_size", where)
        if hidden is None:
            raise cannot_estimate(where, "it has neither head_dim nor hidden_size")
        if hidden % heads:
            raise cannot_estimate(where, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                                         "and there is no head_dim")
        head_dim = hidden // heads
    raw_dtype = _field(config, "torch_dtype")
    if raw_dtype is None:
        raw_dtype = _field(config, "dtype")
    dtype = raw_dtype if isinstance(raw_dtype, str) else None
    if raw_dtype is not None and dtype is None:
        raise cannot_estimate(where, f"torch_dtype is {raw_dtype!r}, not a dtype name")
    return ModelShape(
        where=where, layers=layers, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
        dtype_bytes=dtype_bytes(dtype), context_tokens=_positive(config, "max_position_embeddings", where),
        context_key="max_position_embeddings",
    )


def read_config(directory: Path) -> ModelShape:
    """The shape from `directory/config.json`; InvalidInput when it is missing, not JSON, or lacks a field."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise cannot_estimate(directory, "it has no config.json")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise cannot_estimate(path, f"the file cannot be read ({exc.strerror or exc})") from None
    try:
        config = json.loads(raw)
    except ValueError:
        raise cannot_estimate(path, "it is not valid JSON") from None
    if not isinstance(config, dict):
        raise cannot_estimate(path, "it is not a JSON object")
    return shape_from_config(config, path)
