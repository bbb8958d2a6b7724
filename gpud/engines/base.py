"""What every engine shares: the launch context and plan, the Engine protocol, and the utilization rule.

Everything here is pure: an engine turns an `EngineContext` (what to serve, where, with how much GPU
memory) into a `LaunchPlan` (argv, health path, start timeout). The supervisor does the I/O: it adds the
environment of SPEC §6, spawns the argv and polls the health path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gpud.errors import InvalidInput

# vLLM's --gpu-memory-utilization is expressed in thousandths here: fine enough that the engine gets
# within 0.1% of its reservation, coarse enough to print cleanly.
_UTILIZATION_SCALE = 1000


@dataclass(frozen=True)
class EngineContext:
    """Everything a builder needs to launch one replica."""

    model: str  # what to serve (e.g. "Qwen/Qwen2.5-7B-Instruct", or a local path)
    name: str  # served model name (the gpud model name)
    args: tuple[str, ...]  # engine args given after `--`
    command: str | None  # template for the command engine
    port: int
    host: str  # "127.0.0.1"
    vram_bytes: int  # reservation per GPU (min over the replica's GPUs)
    total_bytes: int  # total memory of the replica's smallest GPU
    python: str  # interpreter to use (the model's venv's python, else sys.executable)
    bin_dir: str | None  # the venv's bin/ when the model has a venv, else None
    # Readiness path; SPEC §10 makes it configurable for the command engine (llama.cpp, TGI… differ).
    health_path: str = "/health"


@dataclass(frozen=True)
class LaunchPlan:
    """What the supervisor runs and how it decides the replica is ready."""

    argv: list[str]
    health_path: str  # "/health"
    start_timeout_sec: float  # the engine's default; a model's start_timeout_sec wins


class Engine(Protocol):
    """One way of running a replica. `validate` runs when a request is checked, before anything changes."""

    name: str
    start_timeout_sec: float  # SPEC §10: 600 for vllm and command, 30 for sim

    def validate(self, args: Sequence[str], command: str | None) -> None:
        """Raise InvalidInput for engine args or a command template this engine cannot run."""
        ...

    def build(self, ctx: EngineContext) -> LaunchPlan:
        """The argv and readiness check of one replica."""
        ...


def gpu_memory_utilization(vram_bytes: int, total_bytes: int) -> float:
    """The fraction of the GPU an engine may use: vram/total rounded DOWN to 3 decimals, at most 1.0.

    Rounding down keeps the engine inside its reservation (SPEC §4); integer arithmetic avoids the
    float error that could push e.g. 0.375 to 0.37500000001 and then floor it wrongly.
    """
    if total_bytes <= 0:
        raise InvalidInput(f"The GPU's total memory must be positive, got {total_bytes} bytes.")
    if vram_bytes <= 0:
        raise InvalidInput(f"The memory reservation must be positive, got {vram_bytes} bytes.")
    thousandths = min(vram_bytes * _UTILIZATION_SCALE // total_bytes, _UTILIZATION_SCALE)
    if thousandths == 0:
        raise InvalidInput(
            f"A reservation of {vram_bytes} bytes is under 0.1% of the GPU's {total_bytes} bytes, "
            "too small to express as --gpu-memory-utilization."
        )
    return thousandths / _UTILIZATION_SCALE


def format_utilization(value: float) -> str:
    """Render a utilization for argv without float noise or exponent notation ("0.375", "1.0")."""
    return f"{value:.3f}".rstrip("0").rstrip(".") if value != 1.0 else "1.0"


def check_no_nul(values: Sequence[str], what: str) -> None:
    """An argv element cannot hold a NUL byte; say so now rather than fail at spawn time."""
    for value in values:
        if "\0" in value:
            raise InvalidInput(f"The {what} must not contain a NUL character.")
