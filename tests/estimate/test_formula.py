"""The pure formula of SPEC §11 and the Estimate record."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud.errors import InvalidInput
from gpud.estimate.formula import Estimate, MiB, compute, kv_bytes_per_token, per_gpu_bytes

GiB = 2**30


def test_qwen_7b_numbers_by_hand() -> None:
    # 2 × 28 layers × 4 KV heads × 128 dims × 2 bytes = 56 KiB per token.
    assert kv_bytes_per_token(28, 4, 128, 2) == 56 * 1024
    weights = 15_231_233_024
    kv = 56 * 1024 * 32768 * 4
    assert kv == 7 * GiB
    expected = -(-(weights + kv + 2 * GiB) // MiB) * MiB
    assert per_gpu_bytes(weights, 56 * 1024, 32768, 4, 1, 2 * GiB) == expected


def test_tensor_parallel_splits_weights_and_kv_not_the_overhead() -> None:
    assert per_gpu_bytes(100 * GiB, 0, 1, 1, 4, 2 * GiB) == 27 * GiB
    assert per_gpu_bytes(3, 0, 1, 1, 2, 0) == MiB  # ceil(3 / 2) = 2 bytes, then a whole MiB


@given(weights=st.integers(0, 2**45), per_token=st.integers(0, 2**22), context=st.integers(1, 2**21),
       sequences=st.integers(1, 64), gpus=st.integers(1, 64), overhead=st.integers(0, 2**34))
def test_per_gpu_is_the_exact_share_rounded_up_to_a_mib(weights: int, per_token: int, context: int,
                                                        sequences: int, gpus: int, overhead: int) -> None:
    got = per_gpu_bytes(weights, per_token, context, sequences, gpus, overhead)
    exact = (weights + per_token * context * sequences) / gpus + overhead
    assert got % MiB == 0
    assert got >= exact and got - exact < MiB + 1
    assert got * gpus >= weights + per_token * context * sequences  # K GPUs together hold it all


def _estimate(**overrides: object) -> Estimate:
    values: dict[str, object] = dict(source="/m", format="safetensors", weights_bytes=10 * GiB, layers=32, kv_heads=8,
                                     head_dim=128, kv_dtype_bytes=2, context_tokens=8192,
                                     context_from="--max-model-len", sequences=4, overhead_bytes=2 * GiB,
                                     gpus_per_replica=2)
    values.update(overrides)
    return compute(**values)  # type: ignore[arg-type]


def test_the_record_round_trips_and_carries_its_breakdown() -> None:
    est = _estimate()
    assert est.kv_bytes_per_token == 128 * 1024 and est.kv_bytes == 4 * GiB
    assert est.per_gpu_bytes == 9 * GiB  # (10 + 4) / 2 + 2
    body = est.to_json()
    assert {"source", "weights_bytes", "kv_bytes_per_token", "context_tokens", "sequences", "overhead_bytes",
            "per_gpu_bytes"} <= set(body)
    assert Estimate.from_json(body) == est


@pytest.mark.parametrize("broken", [None, [], {"source": "/m"}, "x"])
def test_a_damaged_record_is_refused(broken: object) -> None:
    with pytest.raises(InvalidInput, match="Invalid estimate"):
        Estimate.from_json(broken)
    body = _estimate().to_json()
    for key, value in (("weights_bytes", "1"), ("source", 3), ("sequences", True), ("per_gpu_bytes", 0)):
        with pytest.raises(InvalidInput, match="Invalid estimate"):
            Estimate.from_json({**body, key: value})
