"""ModelSpec validation, env merge and secret masking (SPEC §2, §6, §8)."""

from __future__ import annotations

import pytest

from gpud.errors import InvalidInput
from gpud.spec import ModelSpec, mask_env, merge_env, parse_env_assignment, validate_model_name


@pytest.mark.parametrize("name", ["demo", "Qwen/Qwen2.5-7B-Instruct", "a:b_c-d.e", "9", "x" * 128])
def test_valid_names(name: str) -> None:
    assert validate_model_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "../x", "a/../b", "a//b", "a/", "a/./b", ".hidden", "-x", "x" * 129, "a b", "a\nb", "ü", None, 3]
)
def test_invalid_names(name: object) -> None:
    with pytest.raises(InvalidInput):
        validate_model_name(name)


def test_spec_defaults_and_round_trip() -> None:
    spec = ModelSpec.from_json({"model": "Org/M"})
    assert (spec.name, spec.engine, spec.replicas, spec.vram_bytes, spec.placement) == ("Org/M", "vllm", 1, None, "spread")
    full = ModelSpec.from_json({
        "name": "n", "model": "m", "engine": "sim", "replicas": 3, "gpus_per_replica": 2, "vram": "1.5GiB",
        "gpu_idx": [1, 0], "placement": "pack", "env": {"A": "x=y\nz"}, "unset_env": ["B"],
        "venv": {"packages": ["six"]}, "args": ["--ttft-ms", "1"], "start_timeout_sec": 5,
    })
    assert full.vram_bytes == 1610612736 and full.gpu_idx == (1, 0)
    assert ModelSpec.from_json(full.to_json()) == full


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, "Missing field 'model'"),
        ({"model": "m", "replicas": True}, "replicas"),
        ({"model": "m", "replicas": 2000}, "replicas"),
        ({"model": "m", "vram": 0}, "vram"),
        ({"model": "m", "vram": "-1GiB"}, "vram"),
        ({"model": "m", "gpu_idx": [0, 0]}, "twice"),
        ({"model": "m", "gpu_idx": []}, "gpu_idx"),
        ({"model": "m", "gpu_idx": [-1]}, "gpu_idx"),
        ({"model": "m", "placement": "random"}, "placement"),
        ({"model": "m", "env": {"GPUD_PORT": "1"}}, "managed by gpud"),
        ({"model": "m", "env": {"CUDA_VISIBLE_DEVICES": "0"}}, "--gpu-idx"),
        ({"model": "m", "env": {"A": "nul\0"}}, "NUL"),
        ({"model": "m", "env": {"A": 1}}, "string"),
        ({"model": "m", "env": []}, "env"),
        ({"model": "m", "unset_env": ["CUDA_DEVICE_ORDER"]}, "managed"),
        ({"model": "m", "venv": {"packages": "six"}}, "packages"),
        ({"model": "m", "venv": {"pkgs": []}}, "venv"),
        ({"model": "m", "venv": {"packages": ["--index-url=http://evil"]}}, "installer options"),
        ({"model": "m", "venv": {"packages": ["not a requirement!"]}}, "expected a requirement"),
        ({"model": "m", "args": "--x"}, "args"),
        ({"model": "m", "start_timeout_sec": 0}, "start_timeout_sec"),
        ({"model": "m", "health_path": "health"}, "health_path"),
        ({"model": "m", "health_path": "/he alth"}, "health_path"),
        ({"model": "m", "health_path": "/x\r\nHost: evil"}, "health_path"),
        ({"model": "m", "start_timeout_sec": float("nan")}, "start_timeout_sec"),
        ({"model": "m", "start_timeout_sec": float("inf")}, "start_timeout_sec"),
        ({"model": "m", "bogus": 1}, "Unknown field 'bogus'"),
        ("m", "JSON object"),
    ],
)
def test_invalid_requests_say_what_is_wrong(body: object, words: str) -> None:
    with pytest.raises(InvalidInput) as err:
        ModelSpec.from_json(body)
    assert words in err.value.message


def test_env_assignment_keeps_equals_and_newlines() -> None:
    assert parse_env_assignment("A=b=c\nd") == ("A", "b=c\nd")
    assert parse_env_assignment("A=") == ("A", "")
    for bad in ("A", "=x", "1A=x", "GPUD_MODEL=x"):
        with pytest.raises(InvalidInput):
            parse_env_assignment(bad)


def test_merge_order_later_wins_and_managed_last() -> None:
    env = merge_env(
        {"A": "daemon", "B": "daemon", "C": "daemon", "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
        {"B": "config", "C": "config"},
        {"C": "model"},
        ["A"],
        {"CUDA_VISIBLE_DEVICES": "1"},
    )
    assert env == {"B": "config", "C": "model", "CUDA_VISIBLE_DEVICES": "1"}


def test_secrets_are_masked() -> None:
    masked = mask_env({"HF_TOKEN": "t", "api_key": "k", "DB_PASSWORD": "p", "MY_SECRET_X": "s", "PLAIN": "v"})
    assert masked == {"HF_TOKEN": "***", "api_key": "***", "DB_PASSWORD": "***", "MY_SECRET_X": "***", "PLAIN": "v"}


def test_demand_fields_round_trip_and_refusals() -> None:
    """SPEC §12 fields: idle_timeout (a duration), on_demand, max_replicas >= replicas, target_inflight >= 1."""
    spec = ModelSpec.from_json({"model": "m", "idle_timeout": "1.5h", "on_demand": True, "replicas": 2,
                                "max_replicas": 4, "target_inflight": 3})
    assert (spec.idle_timeout_sec, spec.on_demand, spec.max_replicas, spec.target_inflight) == (5400, True, 4, 3)
    assert spec.evictable and ModelSpec.from_json(spec.to_json()) == spec
    plain = ModelSpec.from_json({"model": "m"})
    assert (plain.idle_timeout_sec, plain.on_demand, plain.max_replicas, plain.target_inflight) == (0, False, None, 8)
    assert not plain.evictable and ModelSpec.from_json({"model": "m", "idle_timeout": 90}).evictable
    for body, words in [({"idle_timeout": "5x"}, "idle_timeout"), ({"idle_timeout": -1}, "negative"),
                        ({"on_demand": 1}, "on_demand"), ({"replicas": 3, "max_replicas": 2}, "below replicas"),
                        ({"max_replicas": 0}, "max_replicas"), ({"target_inflight": 0}, "target_inflight")]:
        with pytest.raises(InvalidInput, match=words):
            ModelSpec.from_json({"model": "m", **body})
