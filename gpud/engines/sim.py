"""The `sim` engine: gpud's own simulated OpenAI-compatible server (`python -m gpud.sim.server`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from gpud.engines.base import EngineContext, LaunchPlan
from gpud.errors import InvalidInput

HEALTH_PATH = "/health"

# The engine args a user may give, and whether each takes whole numbers only. Kept in step with the
# argument parser of gpud.sim.server, which would otherwise fail at spawn time with a usage message.
SIM_FLAGS: dict[str, bool] = {
    "--startup-s": False,
    "--ttft-ms": False,
    "--itl-ms": False,
    "--max-num-seqs": True,
    "--prefill-ms-per-1k-tokens": False,  # SPEC §13: prefill cost of uncached prompt tokens
    "--prefix-cache-tokens": True,  # SPEC §13: prefix cache size, 0 = none
}
_MANAGED = ("--host", "--port", "--served-model-name")


def _check_value(flag: str, raw: str) -> None:
    integer = SIM_FLAGS[flag]
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise InvalidInput(f"The sim engine flag {flag} needs {kind}, got {raw!r}.") from None
    if not math.isfinite(value) or value < 0:
        raise InvalidInput(f"The sim engine flag {flag} needs a finite value of 0 or more, got {raw!r}.")
    if flag == "--max-num-seqs" and value < 1:
        raise InvalidInput("The sim engine flag --max-num-seqs needs at least 1, or no request could run.")


def _validate(args: Sequence[str], command: str | None) -> None:
    """Accept only the sim server's own flags, each with a valid number, as `--x v` or `--x=v`."""
    if command is not None:
        raise InvalidInput("--command is only for --engine command; the sim engine builds its own command.")
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, inline = arg.partition("=")
        if flag in _MANAGED:
            raise InvalidInput(f"{flag} is set by gpud for the sim engine; leave it out of the engine args.")
        if flag not in SIM_FLAGS:
            known = ", ".join(SIM_FLAGS)
            raise InvalidInput(f"The sim engine does not know the argument {arg!r}; it takes {known}.")
        if eq:
            _check_value(flag, inline)
            i += 1
        else:
            if i + 1 >= len(args):
                raise InvalidInput(f"The sim engine flag {flag} needs a value.")
            _check_value(flag, args[i + 1])
            i += 2


def _build(ctx: EngineContext, start_timeout_sec: float) -> LaunchPlan:
    """`PYTHON -m gpud.sim.server --host H --port P --served-model-name N ARGS…` on the model's interpreter."""
    argv = [
        ctx.python,
        "-m",
        "gpud.sim.server",
        "--host",
        ctx.host,
        "--port",
        str(ctx.port),
        "--served-model-name",
        ctx.name,
        *ctx.args,
    ]
    return LaunchPlan(argv=argv, health_path=HEALTH_PATH, start_timeout_sec=start_timeout_sec)


class SimEngine:
    name = "sim"
    start_timeout_sec = 30.0

    def validate(self, args: Sequence[str], command: str | None) -> None:
        _validate(args, command)

    def build(self, ctx: EngineContext) -> LaunchPlan:
        return _build(ctx, self.start_timeout_sec)


SIM = SimEngine()
