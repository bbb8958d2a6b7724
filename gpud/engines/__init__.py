"""The engines gpud can run a replica with, by name: a typed registry that validation, the CLI and the
supervisor all read (`ENGINES`), as pre-commit's languages are one table.

`validate_engine_request` runs at request-validation time, before anything changes, so that a bad engine
flag or command template is refused with exit 2 / HTTP 422 and leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpud.engines.base import (
    Engine,
    EngineContext,
    LaunchPlan,
    check_no_nul,
    format_utilization,
    gpu_memory_utilization,
)
from gpud.engines.command import COMMAND
from gpud.engines.sim import SIM
from gpud.engines.vllm import VLLM
from gpud.errors import InvalidInput

ENGINES: dict[str, Engine] = {engine.name: engine for engine in (VLLM, SIM, COMMAND)}
DEFAULT_ENGINE = VLLM.name


def engine_named(name: object) -> Engine:
    """The engine called `name`; InvalidInput naming the known ones otherwise."""
    engine = ENGINES.get(name) if isinstance(name, str) else None
    if engine is None:
        raise InvalidInput(f"Unknown engine {name!r}: use one of {', '.join(ENGINES)}.")
    return engine


def validate_engine_request(engine: str, args: Sequence[str], command: str | None) -> None:
    """Check an engine, its args and its command template; raise InvalidInput on the first problem."""
    found = engine_named(engine)
    check_no_nul(args, "engine arguments")
    found.validate(args, command)


def build_launch(engine: str, ctx: EngineContext) -> LaunchPlan:
    """The launch plan of one replica for `engine`."""
    return engine_named(engine).build(ctx)


__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "Engine",
    "EngineContext",
    "LaunchPlan",
    "build_launch",
    "engine_named",
    "format_utilization",
    "gpu_memory_utilization",
    "validate_engine_request",
]
