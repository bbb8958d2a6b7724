"""The `gpud` command line's grammar (SPEC §5): argparse, with one-sentence usage errors."""

from __future__ import annotations

import argparse
from typing import Any

from gpud import __version__
from gpud.cli import commands, render
from gpud.cli.commands import WAIT_TIMEOUTS
from gpud.config import UiSettings
from gpud.engines import ENGINES
from gpud.gpus.placement import POLICIES
from gpud.spec import ROUTING_POLICIES


class UsageError(Exception):
    """argparse found bad flags; main prints one sentence and exits 2."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.message = message
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--rep` silently meaning --replicas surprises scripts
        super().__init__(*args, **kwargs)
        if kwargs.get("prog", "gpud") != "gpud":
            # SPEC puts --socket before the command; accepting it after the command too costs nothing.
            self.add_argument("--socket", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse would print the whole usage block; one sentence and a pointer to --help is kinder.
        raise UsageError(message, self.prog)


# ---- parsing -----------------------------------------------------------------------------------------


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")


def _add_wait(p: argparse.ArgumentParser, op: str) -> None:
    """Options of the commands that wait for their change (and, but for start, take NAME first)."""
    if op != "start":
        p.add_argument("name", metavar="NAME")
    p.add_argument("--no-wait", action="store_true", help="return at once instead of waiting for the change")
    p.add_argument(
        "--timeout", metavar="S", help=f"seconds to wait before giving up (default {WAIT_TIMEOUTS[op]:g})"
    )
    _add_output(p)


def _add_placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", metavar="N", help="number of replicas (default 1)")
    p.add_argument("--gpus-per-replica", metavar="K", help="GPUs per replica (default 1)")
    p.add_argument("--vram", metavar="SIZE", help="memory per GPU per replica, e.g. 20GiB, or auto to compute "
                   "it from the model's files (default: whole GPUs)")
    p.add_argument("--gpu-idx", metavar="0,1", help="GPUs the replicas may use (default: all)")
    p.add_argument("--placement", choices=POLICIES, help="spread (default) or pack")
    p.add_argument("--context-tokens", metavar="N", help="with --vram auto: tokens per sequence in the KV cache "
                   "(default: --max-model-len, else the model's trained context)")
    p.add_argument("--kv-sequences", metavar="N", help="with --vram auto: full-length sequences the KV cache "
                   "holds at once (default: [estimate] kv_sequences, 4)")


def _read_command(
    sub: Any, name: str, help_text: str, method: str, path: str, formatter: commands.Formatter
) -> None:
    """A command that sends one request and prints the answer (`model list`, `gpus`, `status`, …)."""
    p = sub.add_parser(name, help=help_text)
    _add_output(p)
    p.set_defaults(func=commands.cmd_read, route=(method, path), formatter=formatter)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpud", description="Run LLM model replicas on this machine's GPUs.")
    parser.add_argument("--socket", metavar="PATH", help="control socket (default: $GPUD_SOCKET or the per-user path)")
    parser.add_argument("--version", action="version", version=f"gpud {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    sub.add_parser("daemon", help="run the daemon (see `gpud daemon --help`)", add_help=False)

    model = sub.add_parser("model", help="start, inspect and stop models").add_subparsers(
        dest="model_cmd", metavar="ACTION", required=True, parser_class=_Parser
    )
    p = model.add_parser("start", help="start a model", usage="gpud model start MODEL [options] [-- ENGINE_ARGS…]")
    p.add_argument("model", metavar="MODEL", help="the model to serve, e.g. Qwen/Qwen2.5-7B-Instruct")
    p.add_argument("--name", help="the name clients use (default: MODEL)")
    p.add_argument("--engine", choices=tuple(ENGINES), help=f"{', '.join(ENGINES)} (default vllm)")
    _add_placement(p)
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE", help="environment override")
    p.add_argument("--unset-env", action="append", default=[], metavar="KEY", help="remove an inherited variable")
    p.add_argument("--venv-package", action="append", default=[], metavar="REQ", help="install REQ in a venv")
    p.add_argument("--command", metavar="TEMPLATE", help="server command for --engine command")
    p.add_argument("--health-path", metavar="PATH", help="readiness path polled until it answers 200 (default /health)")
    p.add_argument("--start-timeout", metavar="S", help="seconds a replica may take to become ready "
                   "(default: the engine's, 600 for vllm and command)")
    p.add_argument("--routing", choices=ROUTING_POLICIES,
                   help="least-conn (default), session (X-Session-ID or user) or prefix (the prompt's prefix)")
    p.add_argument("--idle-timeout", metavar="DURATION",
                   help="unload after this long without a request, e.g. 15m, 1.5h, 90s (default 0: never)")
    p.add_argument("--on-demand", action="store_true", help="load nothing until a request (or `model load`) asks")
    p.add_argument("--max-replicas", metavar="M", help="add replicas under load, up to M (default: no scaling)")
    p.add_argument("--target-inflight", metavar="T",
                   help="requests in flight per replica before another is added (default 8)")
    _add_wait(p, "start")
    p.set_defaults(func=commands.cmd_start)
    _read_command(model, "list", "list models", "GET", "/v1/models", render.format_model_list)
    p = model.add_parser("show", help="show one model and its replicas")
    p.add_argument("name", metavar="NAME")
    _add_output(p)
    p.set_defaults(func=commands.cmd_show)
    p = model.add_parser("stop", help="stop a model and free its GPUs")
    _add_wait(p, "stop")
    p.set_defaults(func=commands.cmd_stop)
    p = model.add_parser("scale", help="change the number of replicas")
    p.add_argument("--replicas", metavar="N", required=True, help="the new number of replicas")
    _add_wait(p, "scale")
    p.set_defaults(func=commands.cmd_scale)
    p = model.add_parser("restart", help="restart every replica")
    p.add_argument("--rolling", action="store_true", help="one replica at a time, keeping the others serving")
    _add_wait(p, "restart")
    p.set_defaults(func=commands.cmd_restart)
    p = model.add_parser("unload", help="unload a model now (it wakes on its next request)")
    _add_wait(p, "unload")
    p.set_defaults(func=commands.cmd_unload)
    p = model.add_parser("load", help="load an idle model now, evicting idle ones if room is needed")
    _add_wait(p, "load")
    p.set_defaults(func=commands.cmd_load)
    p = model.add_parser("logs", help="print a replica's log")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--replica", metavar="I", default="0", help="replica index (default 0)")
    p.add_argument("-n", "--lines", metavar="LINES", help="only the last LINES lines")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C")
    p.set_defaults(func=commands.cmd_logs)

    _read_command(sub, "gpus", "the GPU ledger", "GET", "/v1/gpus", render.format_gpus)
    p = sub.add_parser("plan", help="dry-run a placement",
                       usage="gpud plan [MODEL] [--gpus SPEC] [options] [-- ENGINE_ARGS…]")
    p.add_argument("model", metavar="MODEL", nargs="?", help="the model to plan for (needed by --vram auto)")
    p.add_argument("--gpus", metavar="SPEC", help="plan locally on these GPUs (auto or sim:…), without a daemon")
    p.add_argument("--headroom", metavar="SIZE", help="memory kept free per GPU with --gpus (default 512MiB, as the daemon's)")
    _add_placement(p)
    _add_output(p)
    p.set_defaults(func=commands.cmd_plan)
    _read_command(sub, "status", "daemon version, uptime and counts", "GET", "/v1/status", render.format_status)
    p = sub.add_parser("ui", help="serve a live web page of this box (GPUs, models, actions)")
    p.add_argument("--listen", metavar="HOST:PORT", help=f"where the page is served (default {UiSettings().listen}: "
                   "this machine only)")
    p.add_argument("--no-open", action="store_true", help="do not open a browser; only print the URL")
    p.set_defaults(func=commands.cmd_ui)
    venv = sub.add_parser("venv", help="cached virtualenvs").add_subparsers(
        dest="venv_cmd", metavar="ACTION", required=True, parser_class=_Parser
    )
    _read_command(venv, "list", "list cached virtualenvs", "GET", "/v1/venvs", render.format_venvs)
    _read_command(venv, "prune", "remove virtualenvs no model uses", "POST", "/v1/venvs/prune", render.format_prune)
    return parser


def command_index(argv: list[str]) -> int | None:
    """Position of the command word, skipping the global options before it."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--socket":
            i += 2
        elif token.startswith("-"):
            i += 1
        else:
            return i
    return None


def parse(argv: list[str]) -> argparse.Namespace:
    """Namespace for a client command; `engine_args` holds what follows `--` (None without `--`)."""
    at = command_index(argv)
    head, engine_args = list(argv), None
    if at is not None and "--" in argv[at:]:
        split = argv.index("--", at)
        head, engine_args = argv[:split], argv[split + 1:]
    ns = build_parser().parse_args(head)
    ns.engine_args = engine_args
    if engine_args is not None and getattr(ns, "func", None) not in (commands.cmd_start, commands.cmd_plan):
        raise UsageError("engine arguments after -- are only accepted by `gpud model start` and `gpud plan`", "gpud")
    return ns
