"""ModelSpec: a request to run a model, validated from JSON into a frozen value, and the env merge of SPEC §6.

Everything a user can send is checked here, with one sentence per mistake, before anything changes.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from gpud.demand.duration import parse_duration
from gpud.engines import DEFAULT_ENGINE, engine_named, validate_engine_request
from gpud.errors import InvalidInput
from gpud.estimate.formula import Estimate
from gpud.gpus.placement import POLICIES, PlacementRequest
from gpud.units import parse_size

# SPEC §13: how a model's requests pick a replica (gpud.proxy.routing); least connections by default.
ROUTING_POLICIES = ("least-conn", "session", "prefix")
DEFAULT_ROUTING = "least-conn"
MANAGED_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GPUD_MODEL", "GPUD_REPLICA", "GPUD_PORT")
MAX_REPLICAS = 1024
VRAM_AUTO = "auto"  # SPEC §11: the reservation computed from the model's files
MAX_CONTEXT_TOKENS = 2**30
MAX_KV_SEQUENCES = 65536
DEFAULT_TARGET_INFLIGHT = 8  # SPEC §12: requests in flight per replica before load-based scaling adds one
MAX_TARGET_INFLIGHT = 1_000_000

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEALTH_PATH_RE = re.compile(r"^/[\x21-\x7e]{0,1023}$")
_SECRET_RE = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)
_FIELDS = (
    "name", "model", "engine", "replicas", "gpus_per_replica", "vram", "gpu_idx", "placement",
    "env", "unset_env", "venv", "args", "command", "health_path", "start_timeout_sec",
    "context_tokens", "kv_sequences", "routing",
    "idle_timeout", "on_demand", "max_replicas", "target_inflight",
)


def validate_model_name(name: Any, *, what: str = "model name") -> str:
    """A model name per SPEC §2: 1–128 of [A-Za-z0-9._:/-], starting alnum, no empty/./.. segment."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidInput(
            f"Invalid {what} {name!r}: use 1-128 characters of A-Z a-z 0-9 . _ - : /, starting with a letter or digit."
        )
    if any(seg in ("", ".", "..") for seg in name.split("/")):
        raise InvalidInput(f"Invalid {what} {name!r}: a path segment may not be empty, '.' or '..'.")
    return name


def is_local_path(model: str) -> bool:
    """SPEC §2: MODEL is a local path when it starts with /, ./, ../ or ~ (or names an existing file, which
    only the CLI can tell, in its own working directory)."""
    return model.startswith(("/", "./", "../", "~")) or model in (".", "..")


def validate_model_source(model: Any, *, check_exists: bool = True) -> str:
    """MODEL: a Hugging Face id (the name rules of SPEC §2) or an absolute local path (that exists, unless
    `check_exists` is False: a persisted record is restored even while its disk is not mounted)."""
    if not isinstance(model, str) or not model:
        raise InvalidInput("Invalid model: expected a Hugging Face id such as Qwen/Qwen2.5-7B-Instruct or a path.")
    if not is_local_path(model):
        return validate_model_name(model, what="model")
    if "\0" in model or len(model) > 4096:
        raise InvalidInput("Invalid model path: it is over 4096 characters or contains a NUL character.")
    if not model.startswith("/"):
        raise InvalidInput(
            f"Invalid model {model!r}: a local path must be absolute here (the gpud CLI makes it absolute)."
        )
    if check_exists and not os.path.exists(model):
        raise InvalidInput(f"Invalid model {model!r}: no such file or directory.")
    return model


def default_name(model: str) -> str:
    """NAME when none is given: MODEL itself, or a local path's last component without `.gguf`."""
    if not is_local_path(model):
        return model
    last = model.rstrip("/").rsplit("/", 1)[-1]
    return last[: -len(".gguf")] if last.endswith(".gguf") and len(last) > len(".gguf") else last


def validate_env(env: Any, *, what: str = "env") -> dict[str, str]:
    """Overrides: names [A-Za-z_][A-Za-z0-9_]*, string values without NUL, no gpud-managed name."""
    if not isinstance(env, Mapping):
        raise InvalidInput(f"Invalid {what}: expected an object of NAME: value strings.")
    out: dict[str, str] = {}
    for key, value in env.items():
        validate_env_name(key, what=what)
        if not isinstance(value, str):
            raise InvalidInput(f"Invalid {what} value for {key}: expected a string.")
        if "\0" in value:
            raise InvalidInput(f"Invalid {what} value for {key}: it contains a NUL character.")
        out[key] = value
    return out


def validate_env_name(key: Any, *, what: str = "env") -> str:
    if not isinstance(key, str) or not _ENV_NAME_RE.match(key):
        raise InvalidInput(f"Invalid {what} name {key!r}: use letters, digits and _, not starting with a digit.")
    if key in MANAGED_ENV:
        hint = " use --gpu-idx to choose GPUs" if key.startswith("CUDA") else ""
        raise InvalidInput(f"{key} is managed by gpud and cannot be set or unset;{hint or ' it is set per replica'}.")
    return key


def parse_env_assignment(text: str) -> tuple[str, str]:
    """`KEY=VALUE` from the CLI's --env; the value may contain '=' and newlines."""
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidInput(f"Invalid --env {text!r}: expected KEY=VALUE.")
    validate_env({key: value}, what="--env")
    return key, value


def is_secret(key: str) -> bool:
    return bool(_SECRET_RE.search(key))


def mask_env(env: Mapping[str, str]) -> dict[str, str]:
    """Values of keys that look secret (*TOKEN*, *KEY*, *SECRET*, *PASSWORD*) shown as ***."""
    return {k: ("***" if is_secret(k) else v) for k, v in env.items()}


def merge_env(
    daemon_env: Mapping[str, str],
    config_env: Mapping[str, str],
    model_env: Mapping[str, str],
    unset: Sequence[str],
    managed: Mapping[str, str],
) -> dict[str, str]:
    """SPEC §6 order, later wins: daemon env → config [env] → model env → unset → gpud-managed."""
    env = dict(daemon_env)
    env.update(config_env)
    env.update(model_env)
    for key in unset:
        env.pop(key, None)
    env.update(managed)
    return env


def _int_field(body: Mapping[str, Any], key: str, default: int, *, minimum: int, maximum: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"Invalid {key} {value!r}: expected a whole number.")
    if not minimum <= value <= maximum:
        raise InvalidInput(f"Invalid {key} {value}: expected a number from {minimum} to {maximum}.")
    return value


def _optional_int(body: Mapping[str, Any], key: str, *, maximum: int) -> int | None:
    return None if body.get(key) is None else _int_field(body, key, 0, minimum=1, maximum=maximum)


def _str_list(body: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = body.get(key)
    value = [] if value is None else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput(f"Invalid {key}: expected a list of strings.")
    if any("\0" in v for v in value):
        raise InvalidInput(f"Invalid {key}: an entry contains a NUL character.")
    return tuple(value)


@dataclass(frozen=True)
class ModelSpec:
    """What a user asked for. `name` is what clients see; `model` is what the engine serves."""

    name: str
    model: str
    engine: str = DEFAULT_ENGINE
    replicas: int = 1
    gpus_per_replica: int = 1
    vram_bytes: int | None = None  # per GPU per replica; None = exclusive GPUs (or "auto" not yet estimated)
    gpu_idx: tuple[int, ...] | None = None
    placement: str = "spread"
    env: dict[str, str] = field(default_factory=dict)
    unset_env: tuple[str, ...] = ()
    venv_packages: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    command: str | None = None
    health_path: str = "/health"
    start_timeout_sec: float | None = None
    routing: str = DEFAULT_ROUTING
    # SPEC §11 `vram: "auto"`: vram_bytes is the estimate's per_gpu_bytes once `estimate` is made (at start).
    vram_auto: bool = False
    context_tokens: int | None = None
    kv_sequences: int | None = None
    estimate: Estimate | None = None
    idle_timeout_sec: float = 0.0  # SPEC §12: unload after this long without a request in flight; 0 = never
    on_demand: bool = False  # starts idle; loaded by the first request (or `model load`)
    max_replicas: int | None = None  # load-based scaling up to this many replicas; None = off
    target_inflight: int = DEFAULT_TARGET_INFLIGHT

    @property
    def needs_estimate(self) -> bool:
        """True for `vram: "auto"` before the estimate is made: it cannot be placed yet."""
        return self.vram_auto and self.estimate is None

    def with_estimate(self, estimate: Estimate) -> ModelSpec:
        """This spec reserving exactly what `estimate` computed."""
        return replace(self, vram_bytes=estimate.per_gpu_bytes, estimate=estimate)

    def placement_request(self, replicas: int, multi_replica: bool) -> PlacementRequest:
        """What placement (SPEC §4) is asked for `replicas` of this spec."""
        if self.needs_estimate:  # a bug, not a user error: unestimated "auto" would silently mean whole GPUs
            raise ValueError(f"model {self.name!r}: vram auto must be estimated before it is placed")
        return PlacementRequest(replicas=replicas, gpus_per_replica=self.gpus_per_replica, vram_bytes=self.vram_bytes,
                                gpu_idx=self.gpu_idx, policy=self.placement, multi_replica=multi_replica)

    @property
    def evictable(self) -> bool:
        """SPEC §12: only a model that may go idle anyway may be unloaded to make room for another."""
        return self.on_demand or self.idle_timeout_sec > 0

    @classmethod
    def from_json(cls, body: Any, *, check_files: bool = True) -> ModelSpec:
        """Validate a POST /v1/models body (also a `[models.NAME]` table, and a persisted record, for which
        `check_files` is False: a local MODEL path is not required to exist then, and the record may carry
        the `estimate` made when the model started, so that a restart reserves the same again)."""
        if not isinstance(body, Mapping):
            raise InvalidInput("Invalid request: expected a JSON object.")
        unknown = sorted(set(body) - set(_FIELDS) - (set() if check_files else {"estimate"}))
        if unknown:
            raise InvalidInput(f"Unknown field {unknown[0]!r} (known fields: {', '.join(_FIELDS)}).")
        if "model" not in body:
            raise InvalidInput("Missing field 'model': the model to serve.")
        model = validate_model_source(body["model"], check_exists=check_files)
        if body.get("name") is None:
            name = default_name(model)
            if name != model:
                validate_model_name(name, what="name (the last part of the model path; pass a name)")
        else:
            name = validate_model_name(body["name"], what="name")
        engine = engine_named(body.get("engine", DEFAULT_ENGINE)).name
        placement = body.get("placement", "spread")
        if placement not in POLICIES:
            raise InvalidInput(f"Unknown placement {placement!r}: use spread or pack.")
        vram = body.get("vram")
        vram_auto = isinstance(vram, str) and vram.strip().lower() == VRAM_AUTO
        vram_bytes = None if vram is None or vram_auto else parse_size(vram, what="vram")
        if vram_bytes is not None and vram_bytes <= 0:
            raise InvalidInput("Invalid vram: it must be more than 0 bytes.")
        context_tokens = _optional_int(body, "context_tokens", maximum=MAX_CONTEXT_TOKENS)
        kv_sequences = _optional_int(body, "kv_sequences", maximum=MAX_KV_SEQUENCES)
        if not vram_auto and (context_tokens is not None or kv_sequences is not None):
            raise InvalidInput('context_tokens and kv_sequences only apply with vram "auto" (--vram auto).')
        estimate = None if body.get("estimate") is None else Estimate.from_json(body["estimate"])
        if estimate is not None and not vram_auto:
            raise InvalidInput('Invalid estimate: the record has one but its vram is not "auto".')
        gpu_idx = body.get("gpu_idx")
        if gpu_idx is not None:
            if not isinstance(gpu_idx, list) or not gpu_idx or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in gpu_idx
            ):
                raise InvalidInput("Invalid gpu_idx: expected a non-empty list of GPU indices (0, 1, …).")
            if len(set(gpu_idx)) != len(gpu_idx):
                raise InvalidInput("Invalid gpu_idx: a GPU is listed twice.")
            gpu_idx = tuple(gpu_idx)
        venv = body.get("venv")
        if venv is not None and (not isinstance(venv, Mapping) or set(venv) - {"packages"}):
            raise InvalidInput("Invalid venv: expected {\"packages\": [requirement, …]}.")
        packages = _str_list(venv or {}, "packages")
        if packages:
            # Refuse a bad requirement now (exit 2 / 422, nothing left behind), not when the build starts.
            from gpud.venv.key import normalize_requirements

            normalize_requirements(packages)
        command = body.get("command")
        if command is not None and not isinstance(command, str):
            raise InvalidInput("Invalid command: expected a string template.")
        health_path = body.get("health_path", "/health")
        if not isinstance(health_path, str) or not _HEALTH_PATH_RE.match(health_path):
            raise InvalidInput("Invalid health_path: expected a URL path such as /health (no spaces or control characters).")
        timeout = body.get("start_timeout_sec")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise InvalidInput("Invalid start_timeout_sec: expected a finite number of seconds above 0.")
        unset = _str_list(body, "unset_env")
        for key in unset:
            validate_env_name(key, what="unset_env")
        routing = body.get("routing", DEFAULT_ROUTING)
        if routing not in ROUTING_POLICIES:
            raise InvalidInput(f"Unknown routing {routing!r}: use one of {', '.join(ROUTING_POLICIES)}.")
        replicas = _int_field(body, "replicas", 1, minimum=1, maximum=MAX_REPLICAS)
        idle_timeout = parse_duration(body.get("idle_timeout", 0), what="idle_timeout")
        on_demand = body.get("on_demand", False)
        if not isinstance(on_demand, bool):
            raise InvalidInput("Invalid on_demand: expected true or false.")
        max_replicas = body.get("max_replicas")
        if max_replicas is not None:
            max_replicas = _int_field(body, "max_replicas", 1, minimum=1, maximum=MAX_REPLICAS)
            if max_replicas < replicas:
                raise InvalidInput(
                    f"Invalid max_replicas {max_replicas}: it cannot be below replicas ({replicas})."
                )
        target_inflight = _int_field(body, "target_inflight", DEFAULT_TARGET_INFLIGHT, minimum=1,
                                     maximum=MAX_TARGET_INFLIGHT)
        spec = cls(
            name=name,
            model=model,
            engine=engine,
            replicas=replicas,
            gpus_per_replica=_int_field(body, "gpus_per_replica", 1, minimum=1, maximum=64),
            vram_bytes=vram_bytes,
            gpu_idx=gpu_idx,
            placement=placement,
            env=validate_env({} if body.get("env") is None else body["env"]),
            unset_env=unset,
            venv_packages=packages,
            args=_str_list(body, "args"),
            command=command,
            health_path=health_path,
            start_timeout_sec=None if timeout is None else float(timeout),
            routing=routing,
            vram_auto=vram_auto,
            context_tokens=context_tokens,
            kv_sequences=kv_sequences,
            idle_timeout_sec=idle_timeout,
            on_demand=on_demand,
            max_replicas=max_replicas,
            target_inflight=target_inflight,
        )
        if estimate is not None:
            if estimate.gpus_per_replica != spec.gpus_per_replica:
                raise InvalidInput("Invalid estimate: it was made for another gpus_per_replica.")
            spec = spec.with_estimate(estimate)
        # Engine-specific checks (managed vLLM flags, command templates, sim args) live with the engines.
        validate_engine_request(spec.engine, spec.args, spec.command)
        return spec

    def to_json(self) -> dict[str, Any]:
        """The persisted form; from_json(to_json()) gives the same spec back."""
        d = asdict(self)
        d.pop("vram_bytes")
        d.pop("venv_packages")
        d.pop("vram_auto")
        d["vram"] = VRAM_AUTO if self.vram_auto else self.vram_bytes
        d["estimate"] = None if self.estimate is None else self.estimate.to_json()
        d["idle_timeout"] = d.pop("idle_timeout_sec")
        d["venv"] = {"packages": list(self.venv_packages)} if self.venv_packages else None
        d["gpu_idx"] = list(self.gpu_idx) if self.gpu_idx is not None else None
        for key in ("unset_env", "args"):
            d[key] = list(d[key])
        return {k: v for k, v in d.items() if v is not None}
