"""Where a model's files are and what they declare, turned into its per-GPU memory (see the package docstring)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from gpud.estimate import args as engine_args
from gpud.estimate import gguf, hub, safetensors
from gpud.estimate.formula import Estimate, compute
from gpud.estimate.hfconfig import ModelShape, read_config
from gpud.estimate.refusal import cannot_estimate

__all__ = ["Estimate", "estimate_model", "locate"]


def locate(model: str, environ: Mapping[str, str], revision: str | None = None) -> Path:
    """The file or directory holding `model`: an absolute path as given, else its Hugging Face snapshot."""
    if model.startswith("/"):
        path = Path(model)
        if not path.exists():
            raise cannot_estimate(path, "no such file or directory")
        return path
    return hub.snapshot(model, environ, revision)


def _read(path: Path) -> tuple[str, int, ModelShape]:
    """(format, weights_bytes, shape) of the model at `path`."""
    if path.is_dir():
        if not (path / "config.json").exists() and any(path.glob("*.gguf")):
            raise cannot_estimate(path, "it holds .gguf files but no config.json (give the path of the .gguf "
                                        "file to serve)")
        shape = read_config(path)
        weights, _files = safetensors.read_weights(path)
        return "safetensors", weights, shape
    if not path.is_file():  # a FIFO or a device would block the read, or never end
        raise cannot_estimate(path, "it is neither a directory nor a regular file")
    model = gguf.read_model(path)
    return "gguf", model.weights_bytes, gguf.shape_from_gguf(model)


def estimate_model(
    model: str,
    *,
    args: Sequence[str],
    gpus_per_replica: int,
    context_tokens: int | None,
    sequences: int,
    overhead_bytes: int,
    environ: Mapping[str, str],
) -> Estimate:
    """The estimate of SPEC §11 for MODEL served with engine `args`; InvalidInput when it cannot be made.

    `environ` is the environment the replica would get (its HF_HUB_CACHE / HF_HOME say where to look)."""
    # The engine args are read first: a bad one is refused before any file is opened.
    max_len = engine_args.max_model_len(args)
    _kv_dtype, kv_dtype_bytes = engine_args.kv_cache_bytes(args)
    try:
        path = locate(model, environ, engine_args.engine_arg(args, engine_args.REVISION))
        fmt, weights, shape = _read(path)
    except OSError as exc:  # an unreadable directory or file (permissions, I/O): bad input here, never a 500
        where = exc.filename if exc.filename else model
        raise cannot_estimate(where, (exc.strerror or str(exc)).lower()) from None
    if kv_dtype_bytes is None:
        kv_dtype_bytes = shape.dtype_bytes
        if kv_dtype_bytes is None:
            what = "it has no torch_dtype" if shape.dtype is None else \
                f"its torch_dtype {shape.dtype!r} is not float16, bfloat16 or float32"
            raise cannot_estimate(shape.where, f"{what} (or give --kv-cache-dtype)")
    if context_tokens is not None:
        context, context_from = context_tokens, "--context-tokens"
    elif max_len is not None:
        context, context_from = max_len, engine_args.MAX_MODEL_LEN
    elif shape.context_tokens is not None:
        context, context_from = shape.context_tokens, shape.context_key
    else:
        raise cannot_estimate(shape.where, f"it has no {shape.context_key} (give --context-tokens N)")
    return compute(
        source=str(path), format=fmt, weights_bytes=weights, layers=shape.layers, kv_heads=shape.kv_heads,
        head_dim=shape.head_dim, kv_dtype_bytes=kv_dtype_bytes, context_tokens=context,
        context_from=context_from, sequences=sequences, overhead_bytes=overhead_bytes,
        gpus_per_replica=gpus_per_replica,
    )
