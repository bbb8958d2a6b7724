"""The `command` engine: any OpenAI-compatible server, started from a user's `--command TEMPLATE`.

The template is split like a shell would split it (`shlex`), then each placeholder is substituted
inside one argument. It never goes through a shell, so a model name with spaces, quotes, `$()` or a
newline stays one argument and is never executed: it is data.

Placeholders: {model} {name} {port} {host} {gpu_memory_utilization} {vram_bytes}; `{{` and `}}` are
literal braces. Anything else in braces is refused when the request is validated.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Sequence

from gpud.engines.base import (
    EngineContext,
    LaunchPlan,
    check_no_nul,
    format_utilization,
    gpu_memory_utilization,
)
from gpud.errors import InvalidInput

PLACEHOLDERS: tuple[str, ...] = ("model", "name", "port", "host", "gpu_memory_utilization", "vram_bytes")

# One pass over each argument: an escaped brace, a placeholder, or a stray brace (an error). A single
# pass matters: a substituted value that itself contains "{name}" must stay as it is.
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def _scan(arg: str, replace: Callable[[str], str]) -> str:
    """Rewrite one argument, calling `replace(placeholder)` for each placeholder."""

    def substitute(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        if match.group(1) is None:
            raise InvalidInput(
                f"The command template has an unmatched {token!r} in {arg!r}; write {token * 2} for a "
                "literal brace."
            )
        return replace(match.group(1))

    return _TOKEN.sub(substitute, arg)


def split_template(command: str | None) -> list[str]:
    """Split a template into arguments, checking its syntax and placeholders; raise InvalidInput."""
    if command is None or not command.strip():
        raise InvalidInput("--engine command needs --command TEMPLATE.")
    check_no_nul([command], "command template")
    try:
        parts = shlex.split(command)
    except ValueError as exc:
        # shlex says e.g. "No closing quotation"; keep its words, they name the problem.
        raise InvalidInput(f"The command template cannot be split into arguments: {exc}.") from None
    if not parts:
        raise InvalidInput("--engine command needs --command TEMPLATE.")

    def known(placeholder: str) -> str:
        if placeholder not in PLACEHOLDERS:
            names = " ".join("{" + p + "}" for p in PLACEHOLDERS)
            raise InvalidInput(
                f"The command template uses the unknown placeholder {{{placeholder}}}; the known ones are "
                f"{names}."
            )
        return ""

    for part in parts:
        _scan(part, known)
    return parts


class CommandEngine:
    name = "command"
    start_timeout_sec = 600.0

    def validate(self, args: Sequence[str], command: str | None) -> None:
        """Check the template; engine args are passed through untouched, so any are fine."""
        split_template(command)

    def build(self, ctx: EngineContext) -> LaunchPlan:
        return _build(ctx, self.start_timeout_sec)


def _build(ctx: EngineContext, start_timeout_sec: float) -> LaunchPlan:
    """The template's arguments with placeholders filled in, then the engine args."""
    parts = split_template(ctx.command)
    values: dict[str, str] = {
        "model": ctx.model,
        "name": ctx.name,
        "port": str(ctx.port),
        "host": ctx.host,
        "vram_bytes": str(ctx.vram_bytes),
    }

    def value(placeholder: str) -> str:
        if placeholder == "gpu_memory_utilization":
            # Computed only when used: a server that ignores it should not need a valid total.
            return format_utilization(gpu_memory_utilization(ctx.vram_bytes, ctx.total_bytes))
        return values[placeholder]

    argv = [_scan(part, value) for part in parts]
    argv.extend(ctx.args)
    return LaunchPlan(argv=argv, health_path=ctx.health_path, start_timeout_sec=start_timeout_sec)


COMMAND = CommandEngine()
