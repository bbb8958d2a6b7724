"""Engine launch builders: how each engine (`vllm`, `sim`, `command`) is started and checked for readiness.

Everything here is pure: a builder turns an `EngineContext` (what to serve, where, with how much GPU
memory) into a `LaunchPlan` (argv, health path, start timeout). The supervisor does the I/O: it adds the
environment of SPEC §6, spawns the argv and polls the health path.

`validate_engine_request` runs at request-validation time, before anything changes, so that a bad
engine flag or command template is refused with exit 2 / HTTP 422 and leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpud.errors import InvalidInput

ENGINES: tuple[str, ...] = ("vllm", "sim", "command")

# vLLM's --gpu-memory-utilization is expressed in thousandths here: fine enough that the engine gets
# within 0.1% of its reservation, coarse enough to print cleanly.
_UTILIZATION_SCALE = 1000


@dataclass(frozen=True)
class EngineContext:
    """Everything a builder needs to launch one replica."""

    model: str  # what to serve (e.g. "Qwen/Qwen2.5-7B-Instruct")
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
    start_timeout_sec: float  # 600 for vllm and command, 30 for sim


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


def check_engine(engine: str) -> None:
    """Refuse an engine name gpud does not know."""
    if engine not in ENGINES:
        raise InvalidInput(f"Unknown engine {engine!r}; choose one of {', '.join(ENGINES)}.")


def check_no_nul(values: Sequence[str], what: str) -> None:
    """An argv element cannot hold a NUL byte; say so now rather than fail at spawn time."""
    for value in values:
        if "\0" in value:
            raise InvalidInput(f"The {what} must not contain a NUL character.")


def validate_engine_request(engine: str, args: Sequence[str], command: str | None) -> None:
    """Check an engine, its args and its command template; raise InvalidInput on the first problem.

    Pure and cheap: called while validating a request, before any state changes.
    """
    check_engine(engine)
    check_no_nul(args, "engine arguments")
    _MODULES[engine].validate(args, command)


def build_launch(engine: str, ctx: EngineContext) -> LaunchPlan:
    """Build the launch plan of one replica for `engine`."""
    check_engine(engine)
    return _MODULES[engine].build(ctx)


# Imported last: the engine modules import EngineContext/LaunchPlan and the helpers above from here.
from gpud.engines import command as _command  # noqa: E402
from gpud.engines import sim as _sim  # noqa: E402
from gpud.engines import vllm as _vllm  # noqa: E402

_MODULES = {"vllm": _vllm, "sim": _sim, "command": _command}

__all__ = [
    "ENGINES",
    "EngineContext",
    "LaunchPlan",
    "build_launch",
    "format_utilization",
    "gpu_memory_utilization",
    "validate_engine_request",
]
