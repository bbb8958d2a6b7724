"""From the command line's words to control-API request bodies, checked the way the daemon checks them, so a
mistake is one clear sentence and exit 2 before anything is sent. Pure: no I/O but os.path for MODEL paths.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from gpud.demand.duration import parse_duration
from gpud.errors import InvalidInput
from gpud.estimate.refusal import NEEDS_MODEL
from gpud.spec import (
    MAX_CONTEXT_TOKENS,
    MAX_KV_SEQUENCES,
    MAX_REPLICAS,
    MAX_TARGET_INFLIGHT,
    VRAM_AUTO,
    default_name,
    is_local_path,
    parse_env_assignment,
    validate_env_name,
    validate_model_name,
)
from gpud.units import parse_size


def whole(value: str | None, flag: str, minimum: int, maximum: int | None = None) -> int | None:
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


def seconds(value: str | None, flag: str) -> float | None:
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
    body: dict[str, Any] = {"replicas": whole(ns.replicas, "--replicas", 1, MAX_REPLICAS) or 1}
    k = whole(ns.gpus_per_replica, "--gpus-per-replica", 1, 64)
    if k is not None:
        body["gpus_per_replica"] = k
    auto = ns.vram is not None and ns.vram.strip().lower() == VRAM_AUTO
    if ns.vram is not None:
        if not auto and parse_size(ns.vram, what="--vram") <= 0:
            raise InvalidInput(f"Invalid --vram {ns.vram!r}: it must be more than 0 bytes.")
        body["vram"] = VRAM_AUTO if auto else ns.vram
    context = whole(ns.context_tokens, "--context-tokens", 1, MAX_CONTEXT_TOKENS)
    sequences = whole(ns.kv_sequences, "--kv-sequences", 1, MAX_KV_SEQUENCES)
    if (context is not None or sequences is not None) and not auto:
        raise InvalidInput("--context-tokens and --kv-sequences only apply with --vram auto.")
    if context is not None:
        body["context_tokens"] = context
    if sequences is not None:
        body["kv_sequences"] = sequences
    if ns.gpu_idx is not None:
        body["gpu_idx"] = parse_gpu_idx(ns.gpu_idx)
    if ns.placement is not None:
        body["placement"] = ns.placement
    return body


def model_source(model: str) -> str:
    """MODEL as the daemon must see it: a local path made absolute (it must exist), else a Hugging Face id.
    SPEC §2: a path starts with /, ./, ../ or ~, or names an existing file or directory."""
    if is_local_path(model) or os.path.exists(model):
        path = os.path.abspath(os.path.expanduser(model))
        if not os.path.exists(path):
            raise InvalidInput(f"Invalid MODEL {model!r}: no such file or directory ({path}).")
        return path
    return validate_model_name(model, what="MODEL")


def plan_body(ns: argparse.Namespace) -> dict[str, Any]:
    """The POST /v1/plan body for `gpud plan [MODEL] … [-- ENGINE_ARGS…]`."""
    body = placement_fields(ns)
    if ns.model is not None:
        body["model"] = model_source(ns.model)
    elif body.get("vram") == VRAM_AUTO:
        raise InvalidInput(NEEDS_MODEL)
    if ns.engine_args:
        body["args"] = list(ns.engine_args)
    return body


def start_body(ns: argparse.Namespace) -> dict[str, Any]:
    """The POST /v1/models body for `gpud model start`, checked the way the daemon checks it."""
    model = model_source(ns.model)
    if ns.name is not None:
        name = validate_model_name(ns.name, what="--name")
    else:
        name = validate_model_name(default_name(model), what="name (the last part of MODEL's path; pass --name)")
    # A --command template only makes sense for the command engine, so it implies it.
    engine = ns.engine or ("command" if ns.command is not None else "vllm")
    if engine == "command" and not ns.command:
        raise InvalidInput("The command engine needs --command TEMPLATE, e.g. --command 'my-server --port {port}'.")
    if ns.command is not None and engine != "command":
        raise InvalidInput(f"--command only applies to --engine command, not {engine}.")
    body: dict[str, Any] = {"name": name, "model": model, "engine": engine, **placement_fields(ns)}
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
    if ns.health_path is not None:
        body["health_path"] = ns.health_path
    if ns.routing is not None:
        body["routing"] = ns.routing
    start_timeout = seconds(ns.start_timeout, "--start-timeout")
    if start_timeout is not None:
        body["start_timeout_sec"] = start_timeout
    body.update(demand_fields(ns, body["replicas"]))
    return body


def demand_fields(ns: argparse.Namespace, replicas: int) -> dict[str, Any]:
    """SPEC §12 fields of `model start`: --idle-timeout, --on-demand, --max-replicas, --target-inflight."""
    body: dict[str, Any] = {}
    if ns.idle_timeout is not None:
        parse_duration(ns.idle_timeout, what="--idle-timeout")
        body["idle_timeout"] = ns.idle_timeout  # sent as typed; the daemon parses it the same way
    if ns.on_demand:
        body["on_demand"] = True
    ceiling = whole(ns.max_replicas, "--max-replicas", 1, MAX_REPLICAS)
    if ceiling is not None:
        if ceiling < replicas:
            raise InvalidInput(f"Invalid --max-replicas {ceiling}: it cannot be below --replicas ({replicas}).")
        body["max_replicas"] = ceiling
    target = whole(ns.target_inflight, "--target-inflight", 1, MAX_TARGET_INFLIGHT)
    if target is not None:
        body["target_inflight"] = target
    return body
