"""The `vllm` engine: `vllm serve MODEL` with the flags gpud manages, then the user's engine args."""

from __future__ import annotations

from collections.abc import Sequence

from gpud.engines.base import EngineContext, LaunchPlan, format_utilization, gpu_memory_utilization
from gpud.errors import InvalidInput

HEALTH_PATH = "/health"

# Flags gpud sets itself, with what the user should do instead. A user copy would win (argparse keeps
# the last value), silently breaking the ledger, the port map or the proxy's routing.
MANAGED_FLAGS: dict[str, str] = {
    "--gpu-memory-utilization": "--gpu-memory-utilization is set by gpud from --vram; use --vram instead.",
    "--port": "--port is set by gpud for each replica; clients use the proxy address (daemon --listen).",
    "--host": "--host is set by gpud (replicas listen on 127.0.0.1); clients use the proxy address "
    "(daemon --listen).",
    "--served-model-name": "--served-model-name is set by gpud from the model name; use --name instead.",
    "--model": "--model is set by gpud from MODEL; give the model as the first argument of "
    "`gpud model start`.",
}


def managed_flag(arg: str, managed: dict[str, str]) -> str | None:
    """The managed flag that `arg` would set, if any.

    Recognises `--flag value`, `--flag=value`, vLLM's underscore spelling (`--gpu_memory_utilization`,
    which its parser normalises) and argparse prefixes (`--gpu-memory`), which argparse also accepts.
    """
    if not arg.startswith("--") or arg == "--":
        return None
    flag = arg.split("=", 1)[0].replace("_", "-")
    for name in managed:
        # A prefix shorter than 4 letters ("--p") is ambiguous for argparse, which refuses it itself.
        if flag == name or (len(flag) >= 5 and name.startswith(flag)):
            return name
    return None


class VllmEngine:
    name = "vllm"
    start_timeout_sec = 600.0

    def validate(self, args: Sequence[str], command: str | None) -> None:
        """Refuse a command template and any engine arg that sets a flag gpud manages."""
        if command is not None:
            raise InvalidInput("--command is only for --engine command; the vllm engine builds its own command.")
        for arg in args:
            name = managed_flag(arg, MANAGED_FLAGS)
            if name is not None:
                raise InvalidInput(MANAGED_FLAGS[name])

    def build(self, ctx: EngineContext) -> LaunchPlan:
        return _build(ctx, self.start_timeout_sec)


def _build(ctx: EngineContext, start_timeout_sec: float) -> LaunchPlan:
    """`vllm serve MODEL --host H --port P --served-model-name N --gpu-memory-utilization U ARGS…`."""
    # Resolved through the replica's PATH, which has the model's venv bin/ first (SPEC §6: vllm from the venv),
    # so a venv that layers on a vllm installed beneath it still finds one.
    executable = "vllm"
    utilization = format_utilization(gpu_memory_utilization(ctx.vram_bytes, ctx.total_bytes))
    argv = [
        executable,
        "serve",
        ctx.model,
        "--host",
        ctx.host,
        "--port",
        str(ctx.port),
        "--served-model-name",
        ctx.name,
        "--gpu-memory-utilization",
        utilization,
        *ctx.args,
    ]
    return LaunchPlan(argv=argv, health_path=HEALTH_PATH, start_timeout_sec=start_timeout_sec)


VLLM = VllmEngine()
