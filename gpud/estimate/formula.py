"""The memory estimate of SPEC §11 as a pure function, and the record it leaves (`Estimate`).

    kv_bytes_per_token = 2 × layers × kv_heads × head_dim × kv dtype size          (K and V, every layer)
    per_gpu_bytes      = ceil((weights_bytes + kv_bytes_per_token × context_tokens × sequences) / K)
                         + overhead_bytes, rounded up to a whole MiB                 (K = gpus_per_replica)

Tensor parallelism splits the weights and the KV heads over K GPUs; the overhead (CUDA context,
activations, graphs) is paid on each of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from gpud.errors import InvalidInput

MiB = 2**20


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of KV cache one token takes: a key and a value vector per KV head, in every layer."""
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def per_gpu_bytes(weights_bytes: int, kv_per_token: int, context_tokens: int, sequences: int,
                  gpus_per_replica: int, overhead_bytes: int) -> int:
    """What each of a replica's K GPUs must hold: its share of weights and KV cache, plus the overhead."""
    shared = weights_bytes + kv_per_token * context_tokens * sequences
    total = -(-shared // gpus_per_replica) + overhead_bytes
    return -(-total // MiB) * MiB


@dataclass(frozen=True)
class Estimate:
    """One computed estimate, with every number it came from. Kept with the model (and in the state file)
    so that a restart reserves what was reserved, even if the files changed since."""

    source: str  # the file or directory that was read
    format: str  # "safetensors" | "gguf"
    weights_bytes: int
    layers: int
    kv_heads: int
    head_dim: int
    kv_dtype_bytes: int
    kv_bytes_per_token: int
    context_tokens: int
    context_from: str  # "--context-tokens", "--max-model-len", "max_position_embeddings", "llama.context_length"
    sequences: int
    overhead_bytes: int
    gpus_per_replica: int
    per_gpu_bytes: int

    @property
    def kv_bytes(self) -> int:
        """The whole KV cache of one replica (before it is split over its GPUs)."""
        return self.kv_bytes_per_token * self.context_tokens * self.sequences

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, body: Any) -> Estimate:
        """An estimate as `to_json` wrote it (a state file); InvalidInput when it is not one."""
        if not isinstance(body, dict):
            raise InvalidInput("Invalid estimate: expected an object.")
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = body.get(f.name)
            wanted = str if f.type == "str" else int
            if isinstance(value, bool) or not isinstance(value, wanted):
                raise InvalidInput(f"Invalid estimate: {f.name} is missing or not a {wanted.__name__}.")
            values[f.name] = value
        estimate = cls(**values)
        if estimate.per_gpu_bytes <= 0:
            raise InvalidInput("Invalid estimate: per_gpu_bytes must be more than 0.")
        return estimate


def compute(*, source: str, format: str, weights_bytes: int, layers: int, kv_heads: int, head_dim: int,
            kv_dtype_bytes: int, context_tokens: int, context_from: str, sequences: int, overhead_bytes: int,
            gpus_per_replica: int) -> Estimate:
    """The estimate (SPEC §11) from the numbers the readers found and the request's settings."""
    per_token = kv_bytes_per_token(layers, kv_heads, head_dim, kv_dtype_bytes)
    return Estimate(
        source=source, format=format, weights_bytes=weights_bytes, layers=layers, kv_heads=kv_heads,
        head_dim=head_dim, kv_dtype_bytes=kv_dtype_bytes, kv_bytes_per_token=per_token,
        context_tokens=context_tokens, context_from=context_from, sequences=sequences,
        overhead_bytes=overhead_bytes, gpus_per_replica=gpus_per_replica,
        per_gpu_bytes=per_gpu_bytes(weights_bytes, per_token, context_tokens, sequences, gpus_per_replica,
                                    overhead_bytes),
    )
