"""The `gpud` command line (SPEC §5): argument parsing, client-side checks, waiting with progress, output.

It talks to the daemon only through gpud.cli.client and formats only through gpud.cli.render. Read commands must
feel instant, so nothing heavy is imported at module level: the daemon (`gpud daemon`) and the placement
modules (`gpud plan --gpus`) are imported only by the commands that need them.

Exit codes: 0 ok · 1 other error · 2 invalid input or usage · 3 daemon unreachable · 4 does not fit ·
5 not found · 130 interrupted while waiting (the operation goes on in the daemon).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from gpud import __version__
from gpud.cli import render
from gpud.cli.client import Client, StreamTimeout, model_path
from gpud.config import default_socket_path, parse_bool
from gpud.errors import DaemonUnreachable, DoesNotFit, GpudError, InvalidInput
from gpud.spec import (
    ENGINES,
    MAX_REPLICAS,
    POLICIES,
    parse_env_assignment,
    validate_env_name,
    validate_model_name,
)
from gpud.units import parse_size

# How long a command waits for its change before giving up (the change itself goes on in the daemon).
# Starting includes venv builds and vLLM loading weights, hence the generous default.
WAIT_TIMEOUTS = {"start": 900.0, "scale": 900.0, "restart": 900.0, "stop": 300.0}
EXIT_INTERRUPTED = 130


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
    p.add_argument("--vram", metavar="SIZE", help="memory per GPU per replica, e.g. 20GiB (default: whole GPUs)")
    p.add_argument("--gpu-idx", metavar="0,1", help="GPUs the replicas may use (default: all)")
    p.add_argument("--placement", choices=POLICIES, help="spread (default) or pack")


def _read_command(sub: Any, name: str, help_text: str, method: str, path: str, formatter: str) -> None:
    """A command that sends one request and prints the answer (`model list`, `gpus`, `status`, …)."""
    p = sub.add_parser(name, help=help_text)
    _add_output(p)
    p.set_defaults(func=cmd_read, route=(method, path), formatter=formatter)


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
    p.add_argument("--engine", choices=ENGINES, help="vllm (default), sim, or command")
    _add_placement(p)
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE", help="environment override")
    p.add_argument("--unset-env", action="append", default=[], metavar="KEY", help="remove an inherited variable")
    p.add_argument("--venv-package", action="append", default=[], metavar="REQ", help="install REQ in a venv")
    p.add_argument("--command", metavar="TEMPLATE", help="server command for --engine command")
    _add_wait(p, "start")
    p.set_defaults(func=cmd_start)
    _read_command(model, "list", "list models", "GET", "/v1/models", "format_model_list")
    p = model.add_parser("show", help="show one model and its replicas")
    p.add_argument("name", metavar="NAME")
    _add_output(p)
    p.set_defaults(func=cmd_show)
    p = model.add_parser("stop", help="stop a model and free its GPUs")
    _add_wait(p, "stop")
    p.set_defaults(func=cmd_stop)
    p = model.add_parser("scale", help="change the number of replicas")
    p.add_argument("--replicas", metavar="N", required=True, help="the new number of replicas")
    _add_wait(p, "scale")
    p.set_defaults(func=cmd_scale)
    p = model.add_parser("restart", help="restart every replica")
    p.add_argument("--rolling", action="store_true", help="one replica at a time, keeping the others serving")
    _add_wait(p, "restart")
    p.set_defaults(func=cmd_restart)
    p = model.add_parser("logs", help="print a replica's log")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--replica", metavar="I", default="0", help="replica index (default 0)")
    p.add_argument("-n", "--lines", metavar="LINES", help="only the last LINES lines")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C")
    p.set_defaults(func=cmd_logs)

    _read_command(sub, "gpus", "the GPU ledger", "GET", "/v1/gpus", "format_gpus")
    p = sub.add_parser("plan", help="dry-run a placement")
    p.add_argument("--gpus", metavar="SPEC", help="plan locally on these GPUs (auto or sim:…), without a daemon")
    p.add_argument("--headroom", metavar="SIZE", help="memory kept free per GPU with --gpus (default 512MiB)")
    _add_placement(p)
    _add_output(p)
    p.set_defaults(func=cmd_plan)
    _read_command(sub, "status", "daemon version, uptime and counts", "GET", "/v1/status", "format_status")
    venv = sub.add_parser("venv", help="cached virtualenvs").add_subparsers(
        dest="venv_cmd", metavar="ACTION", required=True, parser_class=_Parser
    )
    _read_command(venv, "list", "list cached virtualenvs", "GET", "/v1/venvs", "format_venvs")
    _read_command(venv, "prune", "remove virtualenvs no model uses", "POST", "/v1/venvs/prune", "format_prune")
    return parser


def _command_index(argv: list[str]) -> int | None:
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
    at = _command_index(argv)
    head, engine_args = list(argv), None
    if at is not None and "--" in argv[at:]:
        split = argv.index("--", at)
        head, engine_args = argv[:split], argv[split + 1:]
    ns = build_parser().parse_args(head)
    ns.engine_args = engine_args
    if engine_args is not None and getattr(ns, "func", None) is not cmd_start:
        raise UsageError("engine arguments after -- are only accepted by `gpud model start`", "gpud")
    return ns


# ---- client-side validation: the same rules the daemon applies, for a fast clear exit 2 ----------------


def _int(value: str | None, flag: str, minimum: int, maximum: int | None = None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        raise InvalidInput(f"Invalid {flag} {value!r}: expected a whole number.") from None
    if number < minimum or (maximum is not None and number > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise InvalidInput(f"Invalid {flag} {number}: expected a number of at least {minimum}{upper}.")
    return number


def _seconds(value: str | None, flag: str) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise InvalidInput(f"Invalid {flag} {value!r}: expected a number of seconds.") from None
    if not seconds > 0:  # also rejects NaN
        raise InvalidInput(f"Invalid {flag} {value!r}: expected a number of seconds above 0.")
    return seconds


def parse_gpu_idx(value: str) -> list[int]:
    """`0,1` → [0, 1]."""
    parts = [p.strip() for p in value.split(",")]
    if not all(p.isdigit() for p in parts):
        raise InvalidInput(f"Invalid --gpu-idx {value!r}: expected GPU indices separated by commas, such as 0,1.")
    indices = [int(p) for p in parts]
    dups = sorted({i for i in indices if indices.count(i) > 1})
    if dups:
        raise InvalidInput(f"Invalid --gpu-idx {value!r}: GPU {dups[0]} is listed twice.")
    return indices


def placement_fields(ns: argparse.Namespace) -> dict[str, Any]:
    """The placement part of a POST /v1/models or /v1/plan body; vram is sent as the user typed it."""
    body: dict[str, Any] = {"replicas": _int(ns.replicas, "--replicas", 1, MAX_REPLICAS) or 1}
    k = _int(ns.gpus_per_replica, "--gpus-per-replica", 1, 64)
    if k is not None:
        body["gpus_per_replica"] = k
    if ns.vram is not None:
        if parse_size(ns.vram, what="--vram") <= 0:
            raise InvalidInput(f"Invalid --vram {ns.vram!r}: it must be more than 0 bytes.")
        body["vram"] = ns.vram
    if ns.gpu_idx is not None:
        body["gpu_idx"] = parse_gpu_idx(ns.gpu_idx)
    if ns.placement is not None:
        body["placement"] = ns.placement
    return body


def start_body(ns: argparse.Namespace) -> dict[str, Any]:
    """The POST /v1/models body for `gpud model start`, checked the way the daemon checks it."""
    validate_model_name(ns.model, what="model")
    name = validate_model_name(ns.name, what="--name") if ns.name is not None else ns.model
    # A --command template only makes sense for the command engine, so it implies it.
    engine = ns.engine or ("command" if ns.command is not None else "vllm")
    if engine == "command" and not ns.command:
        raise InvalidInput("The command engine needs --command TEMPLATE, e.g. --command 'my-server --port {port}'.")
    if ns.command is not None and engine != "command":
        raise InvalidInput(f"--command only applies to --engine command, not {engine}.")
    body: dict[str, Any] = {"name": name, "model": ns.model, "engine": engine, **placement_fields(ns)}
    env: dict[str, str] = {}
    for item in ns.env:
        key, value = parse_env_assignment(item)
        env[key] = value
    if env:
        body["env"] = env
    if ns.unset_env:
        body["unset_env"] = [validate_env_name(key, what="--unset-env") for key in ns.unset_env]
    if ns.venv_package:
        if any(not req.strip() or "\0" in req for req in ns.venv_package):
            raise InvalidInput("Invalid --venv-package: a requirement is empty or contains a NUL character.")
        body["venv"] = {"packages": list(ns.venv_package)}
    if ns.engine_args:
        body["args"] = list(ns.engine_args)
    if ns.command is not None:
        body["command"] = ns.command
    return body


# ---- output ------------------------------------------------------------------------------------------


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _err(message: str) -> None:
    sys.stderr.write(f"gpud: {message}\n")
    sys.stderr.flush()


def _emit(ns: argparse.Namespace, obj: Any, formatter: Callable[[Any], str]) -> None:
    _out(json.dumps(obj, indent=2) if ns.output == "json" else formatter(obj))


def _client(ns: argparse.Namespace) -> Client:
    return Client(ns.socket or default_socket_path())


# ---- waiting -----------------------------------------------------------------------------------------


class Progress:
    """Replica state changes and venv build output on stderr, only when a person is watching."""

    def __init__(self, enabled: bool, seen: Mapping[int, Mapping[str, Any]] | None = None) -> None:
        self.enabled = enabled
        self.seen: dict[int, Mapping[str, Any]] = dict(seen or {})

    def __call__(self, event: dict[str, Any]) -> None:
        """The client's event observer: one line per replica state change; unknown event types are ignored."""
        kind, lines = event.get("type"), []
        if kind == "model" and isinstance(event.get("model"), dict):
            lines = render.replica_changes(self.seen, event["model"])
            self.seen = {r.get("index"): r for r in event["model"].get("replicas") or []}
        elif kind == "replica" and isinstance(event.get("replica"), dict):
            replica = event["replica"]
            line = render.replica_change(self.seen.get(replica.get("index")), replica)
            self.seen[replica.get("index")] = replica
            lines = [line] if line else []
        elif kind == "progress":
            lines = [f"{event.get('phase') or 'progress'}: {event.get('line', '')}"]
        if self.enabled and lines:
            sys.stderr.write("".join(line + "\n" for line in lines))
            sys.stderr.flush()


def _follow_operation(
    ns: argparse.Namespace, client: Client, show: dict[str, Any], op: str, *, fresh: bool = False
) -> int:
    """Wait for the operation the daemon just accepted, then print the result (exit 1 if a replica failed)."""
    name = str(show.get("name"))
    until_removed = op == "stop"
    if not ns.no_wait:
        timeout = _seconds(ns.timeout, "--timeout") or WAIT_TIMEOUTS[op]
        seen = {} if fresh else {r.get("index"): r for r in show.get("replicas") or []}
        progress = Progress(sys.stderr.isatty(), seen)
        check = "gpud model list" if until_removed else f"gpud model show {name}"
        try:
            final = client.wait_for_model(name, until_removed=until_removed, timeout=timeout, observer=progress)
        except StreamTimeout:
            raise GpudError(
                f"Timed out after {timeout:g} s waiting for model {name!r}; the operation goes on in the "
                f"background (check with `{check}`)."
            ) from None
        except KeyboardInterrupt:
            _err(f"Stopped waiting; the operation goes on in the background (check with `{check}`).")
            return EXIT_INTERRUPTED
        if final is not None:
            show = final
    if until_removed:
        if ns.output == "json":
            _emit(ns, show, render.format_model_show)
        else:
            _out(f"{'Stopping' if ns.no_wait else 'Stopped'} model {name!r}.")
        return 0
    _emit(ns, show, render.format_model_show)
    failure = None if ns.no_wait else render.failure_sentence(show)
    if failure:
        _err(failure)
        return 1
    return 0


# ---- commands ----------------------------------------------------------------------------------------


def cmd_start(ns: argparse.Namespace) -> int:
    body = start_body(ns)
    _seconds(ns.timeout, "--timeout")  # a bad --timeout must fail before anything starts
    client = _client(ns)
    show = client.request("POST", "/v1/models", body)
    return _follow_operation(ns, client, show, "start", fresh=True)


def cmd_read(ns: argparse.Namespace) -> int:
    method, path = ns.route
    _emit(ns, _client(ns).request(method, path), getattr(render, ns.formatter))
    return 0


def cmd_show(ns: argparse.Namespace) -> int:
    _emit(ns, _client(ns).request("GET", model_path(ns.name)), render.format_model_show)
    return 0


def cmd_stop(ns: argparse.Namespace) -> int:
    _seconds(ns.timeout, "--timeout")
    client = _client(ns)
    return _follow_operation(ns, client, client.request("DELETE", model_path(ns.name)), "stop")


def cmd_scale(ns: argparse.Namespace) -> int:
    try:
        replicas = _int(ns.replicas, "--replicas", 1, MAX_REPLICAS)
    except InvalidInput as exc:
        if ns.replicas.strip() == "0":
            raise InvalidInput("Invalid --replicas 0: a model needs at least 1 replica (use `gpud model stop`).") from None
        raise exc
    _seconds(ns.timeout, "--timeout")
    client = _client(ns)
    show = client.request("PATCH", model_path(ns.name), {"replicas": replicas})
    return _follow_operation(ns, client, show, "scale")


def cmd_restart(ns: argparse.Namespace) -> int:
    _seconds(ns.timeout, "--timeout")
    client = _client(ns)
    show = client.request("POST", model_path(ns.name, "restart"), {"rolling": ns.rolling})
    return _follow_operation(ns, client, show, "restart")


def cmd_logs(ns: argparse.Namespace) -> int:
    query = {
        "replica": _int(ns.replica, "--replica", 0),
        "lines": _int(ns.lines, "--lines", 0),
        "follow": 1 if ns.follow else 0,
    }
    lines = _client(ns).stream_lines(model_path(ns.name, "logs"), query, timeout=None if ns.follow else 300.0)
    try:
        for line in lines:
            sys.stdout.write(line + "\n")
            if ns.follow:
                sys.stdout.flush()
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how -f ends: quietly, like `tail -f`
    finally:
        lines.close()
    sys.stdout.flush()
    return 0


def local_plan(spec: str, fields: Mapping[str, Any], headroom_bytes: int, multi_replica: bool) -> dict[str, Any]:
    """Place on the GPUs a spec names, in this process: no daemon involved."""
    from gpud.gpus import open_backend
    from gpud.gpus.ledger import Ledger
    from gpud.gpus.placement import PlacementRequest, place, plan_json

    backend = open_backend(spec)
    try:
        views = Ledger(backend, headroom_bytes=headroom_bytes).views()
    finally:
        backend.close()
    vram = fields.get("vram")
    request = PlacementRequest(
        replicas=fields["replicas"],
        gpus_per_replica=fields.get("gpus_per_replica", 1),
        vram_bytes=None if vram is None else parse_size(vram, what="--vram"),
        gpu_idx=tuple(fields["gpu_idx"]) if "gpu_idx" in fields else None,
        policy=fields.get("placement", "spread"),
        multi_replica=multi_replica,
    )
    try:
        return plan_json(place(request, views), None)
    except DoesNotFit as exc:
        plan = exc.details.get("plan")
        return plan if isinstance(plan, dict) else plan_json(None, exc.message)


def cmd_plan(ns: argparse.Namespace) -> int:
    fields = placement_fields(ns)
    if ns.gpus is not None:
        headroom = parse_size(ns.headroom if ns.headroom is not None else "512MiB", what="--headroom")
        flag = os.environ.get("GPUD_ENABLE_SINGLE_GPU_MULTI_REPLICA")
        multi = parse_bool(flag, what="GPUD_ENABLE_SINGLE_GPU_MULTI_REPLICA") if flag else True
        plan = local_plan(ns.gpus, fields, headroom, multi)
    else:
        if ns.headroom is not None:
            raise InvalidInput("--headroom only applies with --gpus; the daemon uses its configured headroom.")
        try:
            plan = _client(ns).request("POST", "/v1/plan", fields)
        except DoesNotFit as exc:
            found = exc.details.get("plan")
            plan = found if isinstance(found, dict) else {"fits": False, "replicas": [], "reason": exc.message}
        except DaemonUnreachable as exc:
            hint = "? `gpud plan --gpus SPEC` needs none)."
            raise DaemonUnreachable(exc.message[:-3] + hint if exc.message.endswith("?).") else exc.message) from None
    if ns.output == "json":
        _out(json.dumps(plan, indent=2))
    elif plan.get("fits"):
        _out(render.format_plan(plan))
    if not plan.get("fits"):
        reason = str(plan.get("reason") or "The request does not fit on these GPUs.")
        _err(reason)
        return DoesNotFit.exit_code
    return 0


# ---- entry point -------------------------------------------------------------------------------------


def _run_daemon(argv: list[str], at: int) -> int:
    """`gpud [--socket P] daemon …`: hand the rest to the daemon untouched (a global --socket goes first)."""
    ns = build_parser().parse_args(argv[:at] + ["status"])  # handles --version/--help and checks --socket
    rest = argv[at + 1:]
    if ns.socket is not None:
        rest = ["--socket", ns.socket, *rest]  # a --socket after `daemon` comes later and wins
    from gpud.daemon import run_daemon

    return run_daemon(rest)


def _sentence(text: str) -> str:
    text = text.strip()
    if not text.startswith("gpud"):  # the program's name stays lower case
        text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ns: argparse.Namespace | None = None
    try:
        at = _command_index(args)
        if at is not None and args[at] == "daemon":
            return _run_daemon(args, at)
        ns = parse(args)
        return int(ns.func(ns))
    except UsageError as exc:
        _err(f"{_sentence(exc.message).rstrip('.')}; see `{exc.prog} --help`.")
        return 2
    except GpudError as exc:
        plan = exc.details.get("plan")
        if ns is not None and getattr(ns, "output", None) == "json" and isinstance(plan, dict):
            _out(json.dumps(plan, indent=2))  # a refusal with a JSON shape still prints it (SPEC §5)
        _err(_sentence(exc.message))
        return exc.exit_code
    except KeyboardInterrupt:
        _err("Interrupted.")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`gpud model list | head`): no message, and no second error at exit.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:
        if os.environ.get("GPUD_DEBUG"):
            raise
        _err(f"Unexpected error ({type(exc).__name__}: {exc}); set GPUD_DEBUG=1 to see the traceback.")
        return 1
