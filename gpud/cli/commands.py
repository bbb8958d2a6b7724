"""What each `gpud` command does: send its request, wait for its change with progress, print the answer.

It talks to the daemon only through gpud.cli.client and formats only through gpud.cli.render.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from gpud.cli import render
from gpud.cli.client import Client, StreamTimeout, model_path
from gpud.cli.requests import plan_body, seconds, start_body, whole
from gpud.config import DEFAULT_HEADROOM_BYTES, default_socket_path, multi_replica_from_env, parse_listen
from gpud.errors import DaemonUnreachable, DoesNotFit, GpudError, InvalidInput
from gpud.spec import MAX_REPLICAS
from gpud.units import parse_size

# How long a command waits for its change before giving up (the change itself goes on in the daemon).
# Starting includes venv builds and vLLM loading weights, hence the generous default.
WAIT_TIMEOUTS = {"start": 900.0, "scale": 900.0, "restart": 900.0, "stop": 300.0, "load": 900.0, "unload": 300.0}
EXIT_INTERRUPTED = 130
Formatter = Callable[[Any], str]  # a gpud.cli.render format_* function


def out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def err(message: str) -> None:
    sys.stderr.write(f"gpud: {message}\n")
    sys.stderr.flush()


def _emit(ns: argparse.Namespace, obj: Any, formatter: Formatter) -> None:
    out(json.dumps(obj, indent=2) if ns.output == "json" else formatter(obj))


def _client(ns: argparse.Namespace) -> Client:
    return Client(ns.socket or default_socket_path())



# ---- waiting ------------------------------------------------------------------------------------------


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
        elif kind in render.DEMAND_EVENTS:
            lines = [render.demand_event(event)]
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
        timeout = seconds(ns.timeout, "--timeout") or WAIT_TIMEOUTS[op]
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
            err(f"Stopped waiting; the operation goes on in the background (check with `{check}`).")
            return EXIT_INTERRUPTED
        if final is not None:
            show = final
    if until_removed:
        if ns.output == "json":
            _emit(ns, show, render.format_model_show)
        else:
            out(f"{'Stopping' if ns.no_wait else 'Stopped'} model {name!r}.")
        return 0
    _emit(ns, show, render.format_model_show)
    failure = None if ns.no_wait else render.failure_sentence(show)
    if op == "load" and not ns.no_wait and show.get("state") == "idle":
        failure = str(show.get("message") or f"Model {name!r} did not load.")
    if failure:
        err(failure)
        return 1
    return 0



# ---- commands -----------------------------------------------------------------------------------------


def cmd_start(ns: argparse.Namespace) -> int:
    body = start_body(ns)
    seconds(ns.timeout, "--timeout")  # a bad --timeout must fail before anything starts
    client = _client(ns)
    show = client.request("POST", "/v1/models", body)
    return _follow_operation(ns, client, show, "start", fresh=True)


def cmd_read(ns: argparse.Namespace) -> int:
    method, path = ns.route
    _emit(ns, _client(ns).request(method, path), ns.formatter)
    return 0


def cmd_show(ns: argparse.Namespace) -> int:
    _emit(ns, _client(ns).request("GET", model_path(ns.name)), render.format_model_show)
    return 0


def cmd_stop(ns: argparse.Namespace) -> int:
    seconds(ns.timeout, "--timeout")
    client = _client(ns)
    return _follow_operation(ns, client, client.request("DELETE", model_path(ns.name)), "stop")


def cmd_scale(ns: argparse.Namespace) -> int:
    try:
        replicas = whole(ns.replicas, "--replicas", 1, MAX_REPLICAS)
    except InvalidInput as exc:
        if ns.replicas.strip() == "0":
            raise InvalidInput("Invalid --replicas 0: a model needs at least 1 replica (use `gpud model stop`).") from None
        raise exc
    seconds(ns.timeout, "--timeout")
    client = _client(ns)
    show = client.request("PATCH", model_path(ns.name), {"replicas": replicas})
    return _follow_operation(ns, client, show, "scale")


def cmd_restart(ns: argparse.Namespace) -> int:
    seconds(ns.timeout, "--timeout")
    client = _client(ns)
    show = client.request("POST", model_path(ns.name, "restart"), {"rolling": ns.rolling})
    return _follow_operation(ns, client, show, "restart")


def cmd_unload(ns: argparse.Namespace) -> int:
    seconds(ns.timeout, "--timeout")
    client = _client(ns)
    return _follow_operation(ns, client, client.request("POST", model_path(ns.name, "unload"), {}), "unload")


def cmd_load(ns: argparse.Namespace) -> int:
    seconds(ns.timeout, "--timeout")
    client = _client(ns)
    show = client.request("POST", model_path(ns.name, "load"), {})
    return _follow_operation(ns, client, show, "load", fresh=True)


def cmd_logs(ns: argparse.Namespace) -> int:
    query = {
        "replica": whole(ns.replica, "--replica", 0),
        "lines": whole(ns.lines, "--lines", 0),
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


def cmd_ui(ns: argparse.Namespace) -> int:
    """`gpud ui`: the dashboard's server runs in this process until Ctrl-C (aiohttp is imported only here)."""
    from gpud.ui.server import run_ui

    if ns.listen is not None:
        parse_listen(ns.listen, what="--listen")  # a bad address is exit 2 before anything starts
    return run_ui(ns.socket or default_socket_path(), ns.listen, not ns.no_open)


def local_plan(spec: str, body: Mapping[str, Any], headroom_bytes: int, multi_replica: bool) -> dict[str, Any]:
    """Place on the GPUs a spec names, in this process: no daemon involved. `--vram auto` reads the model's
    files here too, where this process's environment says (the [estimate] defaults apply)."""
    from gpud.config import EstimateSettings
    from gpud.estimate.request import resolve
    from gpud.gpus import open_backend
    from gpud.gpus.ledger import Ledger
    from gpud.gpus.placement import place, plan_json
    from gpud.spec import ModelSpec

    model = resolve(ModelSpec.from_json({"model": "plan", **body}), EstimateSettings(),
                    daemon_env=os.environ, config_env={})
    estimate = None if model.estimate is None else model.estimate.to_json()
    backend = open_backend(spec)
    try:
        views = Ledger(backend, headroom_bytes=headroom_bytes).views()
    finally:
        backend.close()
    request = model.placement_request(model.replicas, multi_replica)
    try:
        return {**plan_json(place(request, views), None), "estimate": estimate}
    except DoesNotFit as exc:
        plan = exc.details.get("plan")
        return {**(plan if isinstance(plan, dict) else plan_json(None, exc.message)), "estimate": estimate}


def cmd_plan(ns: argparse.Namespace) -> int:
    fields = plan_body(ns)
    if ns.gpus is not None:
        headroom = DEFAULT_HEADROOM_BYTES if ns.headroom is None else parse_size(ns.headroom, what="--headroom")
        multi = multi_replica_from_env(os.environ)
        multi = True if multi is None else multi
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
        out(json.dumps(plan, indent=2))
    elif plan.get("fits"):
        out(render.format_plan(plan))
    elif plan.get("estimate"):  # why it does not fit is half in the estimate: show it
        out(render.format_estimate(plan["estimate"]))
    if not plan.get("fits"):
        reason = str(plan.get("reason") or "The request does not fit on these GPUs.")
        err(reason)
        return DoesNotFit.exit_code
    return 0
