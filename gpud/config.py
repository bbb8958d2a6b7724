"""Daemon settings: defaults < config file (TOML) < GPUD_* environment < flags, validated into frozen values.

Every default lives once, in the dataclasses below; the loader only overrides what a file, the environment
or a flag gives. An unknown key or a wrong type in the file is an InvalidInput that names the key and the file.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gpud.cluster.settings import ClusterSettings, cluster_settings
from gpud.errors import InvalidInput
from gpud.spec import validate_env, validate_model_name
from gpud.supervise.policy import Restart
from gpud.units import parse_size

DEFAULT_HEADROOM_BYTES = 512 * 2**20  # kept free on every GPU (SPEC §3 `gpus.headroom`)
MAX_PROXY_WORKERS = 8


def resolve_workers(value: object, *, what: str, cpus: int | None = None) -> int:
    """`proxy.workers`: a number from 1 to 8, or "auto" = half the CPUs, at least 1, at most 8."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return max(1, min(MAX_PROXY_WORKERS, (cpus or os.cpu_count() or 2) // 2))
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PROXY_WORKERS:
        raise InvalidInput(f"Invalid {what} {value!r}: use a number of workers from 1 to {MAX_PROXY_WORKERS}, "
                           "or auto (half the CPUs).")
    return value


def _is_root() -> bool:
    return os.geteuid() == 0


def _xdg(var: str, fallback: str, environ: Mapping[str, str]) -> Path:
    value = environ.get(var)
    return Path(value) if value else Path(environ.get("HOME", os.path.expanduser("~"))) / fallback


def default_socket_path(environ: Mapping[str, str] = os.environ) -> str:
    """GPUD_SOCKET, else /run/gpud/gpud.sock for root, $XDG_RUNTIME_DIR/gpud/gpud.sock, else /tmp/gpud-$UID/."""
    if environ.get("GPUD_SOCKET"):
        return environ["GPUD_SOCKET"]
    if _is_root():
        return "/run/gpud/gpud.sock"
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return str(Path(runtime) / "gpud" / "gpud.sock")
    return f"/tmp/gpud-{os.getuid()}/gpud.sock"


def default_config_path(environ: Mapping[str, str] = os.environ) -> Path:
    if _is_root():
        return Path("/etc/gpud/gpud.toml")
    return _xdg("XDG_CONFIG_HOME", ".config", environ) / "gpud" / "gpud.toml"


def default_state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    if _is_root():
        return Path("/var/lib/gpud")
    return _xdg("XDG_STATE_HOME", ".local/state", environ) / "gpud"


@dataclass(frozen=True)
class SupervisorSettings:
    """SPEC §7 timings, systemd-like."""

    restart: Restart = Restart.ON_FAILURE
    restart_sec: float = 0.1
    restart_max_delay_sec: float = 30.0
    start_limit_burst: int = 5
    start_limit_interval_sec: float = 300.0
    health_interval_sec: float = 5.0
    health_failures: int = 3
    start_timeout_sec: float | None = None  # None: the engine's default (600 vllm/command, 30 sim)
    drain_timeout_sec: float = 30.0
    stop_timeout_sec: float = 30.0

    def __post_init__(self) -> None:
        # "on-failure" as written in a file is the same policy as Restart.ON_FAILURE (ValueError otherwise).
        object.__setattr__(self, "restart", Restart(self.restart))


@dataclass(frozen=True)
class ProxySettings:
    """SPEC §9 `[proxy]`."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 8000
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 32 * 2**20
    # A replica that sends nothing for this long: 504 before the response, a cut stream after.
    idle_timeout_sec: float = 300.0
    # A client that takes this long to send a request head, pauses this long in a body, or leaves response
    # bytes unread this long is disconnected (nginx's client_header/client_body/send timeouts, 60 s there too).
    client_timeout_sec: float = 60.0
    # Open client connections at most, per worker; 0: half of what the file descriptor limit leaves.
    max_connections: int = 0
    # Proxy worker processes sharing the listen address (SPEC §14); `auto` in a file or GPUD_PROXY_WORKERS
    # is resolved when the settings are read (half the CPUs, 1 to MAX_PROXY_WORKERS).
    workers: int = 1
    # SPEC §13: prefix blocks the `prefix` routing policy remembers (per worker), least recently used dropped.
    prefix_table_blocks: int = 100_000
    # SPEC §12: how long a request for an idle model waits for its wake, and how many may wait per model
    # (one more gets 503 + Retry-After at once; see gpud.proxy.wake).
    wake_timeout_sec: float = 600.0
    wake_queue: int = 1024

    @property
    def listen(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"


@dataclass(frozen=True)
class UiSettings:
    """SPEC §15 `gpud ui`: the dashboard's own server (it is a client of the control API, not the daemon)."""

    listen_host: str = "127.0.0.1"  # loopback: the page can do what its user can do on the socket
    listen_port: int = 8765
    # Counters that change without an event (in-flight requests, memory used by other processes) are
    # re-read this often while a page is open; state changes come from /v1/events at once.
    refresh_sec: float = 2.0
    log_lines: int = 200           # the tail a log view starts with (a huge log is never sent whole)
    log_line_chars: int = 4000     # longer lines are cut, so one runaway line cannot flood the page

    @property
    def listen(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"


@dataclass(frozen=True)
class EstimateSettings:
    """SPEC §11 `[estimate]`: what `--vram auto` assumes when the request does not say."""

    kv_sequences: int = 4  # full-length sequences the KV cache must hold at once
    overhead_bytes: int = 2 * 2**30  # per GPU: CUDA context, activations, graphs


@dataclass(frozen=True)
class ScaleSettings:
    """SPEC §12 `[scale]`: how long load must stay high (low) before a replica is added (removed)."""

    up_after_sec: float = 5.0
    down_after_sec: float = 60.0


@dataclass(frozen=True)
class Settings:
    config_path: Path | None
    socket: str
    socket_group: str | None
    state_dir: Path
    gpus: str = "auto"
    headroom_bytes: int = DEFAULT_HEADROOM_BYTES
    multi_replica: bool = True
    proxy: ProxySettings = field(default_factory=ProxySettings)
    supervisor: SupervisorSettings = field(default_factory=SupervisorSettings)
    estimate: EstimateSettings = field(default_factory=EstimateSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    scale: ScaleSettings = field(default_factory=ScaleSettings)
    env: dict[str, str] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)


_NUMBER = (int, float)
# Allowed keys of each config section and their types; models/env are free-form and checked separately.
_SECTIONS: dict[str, dict[str, tuple[type, ...]]] = {
    "daemon": {"socket": (str,), "state_dir": (str,), "socket_group": (str,)},
    "gpus": {"spec": (str,), "headroom": (str, int)},
    "allocator": {"single_gpu_multi_replica": (bool,)},
    "proxy": {
        "listen": (str,),
        "api_keys": (list,),
        "max_body": (str, int),
        "idle_timeout_sec": _NUMBER,
        "client_timeout_sec": _NUMBER,
        "max_connections": (int,),
        "workers": (int, str),
        "prefix_table_blocks": (int,),
        "wake_timeout_sec": _NUMBER,
        "wake_queue": (int,),
    },
    "estimate": {"kv_sequences": (int,), "overhead": (str, int)},
    "scale": {f.name: _NUMBER for f in fields(ScaleSettings)},
    "supervisor": {
        f.name: ((str,) if f.name == "restart" else (int,) if f.name in ("start_limit_burst", "health_failures")
                 else _NUMBER)
        for f in fields(SupervisorSettings)
    },
    "cluster": {
        "gateway": (str,), "advertise": (str,), "api_key": (str,), "labels": (dict,), "sync_sec": _NUMBER,
        "health_interval_sec": (int,), "health_timeout_sec": (int,), "health_failures": (int,),
        "health_successes": (int,), "request_timeout_sec": _NUMBER, "deregister_timeout_sec": _NUMBER,
    },
}


def parse_listen(value: str, *, what: str = "listen address") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidInput(f"Invalid {what} {value!r}: expected HOST:PORT such as 127.0.0.1:8000.")
    return host.strip("[]") or ProxySettings.listen_host, int(port)


def parse_bool(value: str, *, what: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise InvalidInput(f"Invalid {what} {value!r}: use 1 or 0.")


def multi_replica_from_env(environ: Mapping[str, str]) -> bool | None:
    """GPUD_ENABLE_SINGLE_GPU_MULTI_REPLICA, when set (the daemon and `gpud plan --gpus` read it)."""
    value = environ.get("GPUD_ENABLE_SINGLE_GPU_MULTI_REPLICA")
    return parse_bool(value, what="GPUD_ENABLE_SINGLE_GPU_MULTI_REPLICA") if value else None


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse and type-check the TOML file; errors name the key and the file."""
    # Imported here: the CLI imports this module for default paths and should not pay for a TOML parser.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"Config file {path} is not valid TOML: {exc}.") from None
    except OSError as exc:
        raise InvalidInput(f"Cannot read config file {path}: {exc.strerror}.") from None
    for section, table in data.items():
        if section in ("env", "models"):
            if not isinstance(table, dict):
                raise InvalidInput(f"Config key '{section}' in {path} must be a table.")
            continue
        allowed = _SECTIONS.get(section)
        if allowed is None:
            raise InvalidInput(f"Unknown config section '{section}' in {path}.")
        if not isinstance(table, dict):
            raise InvalidInput(f"Config key '{section}' in {path} must be a table.")
        for key, value in table.items():
            types = allowed.get(key)
            if types is None:
                raise InvalidInput(f"Unknown config key '{section}.{key}' in {path}.")
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                names = " or ".join(t.__name__.replace("str", "string").replace("int", "integer") for t in types)
                raise InvalidInput(f"Config key '{section}.{key}' in {path} must be a {names}.")
    try:
        validate_env(data.get("env", {}), what=f"[env] in {path}:")
    except InvalidInput as exc:
        raise InvalidInput(f"Config section 'env' in {path}: {exc.message}") from None
    for name, table in data.get("models", {}).items():
        if not isinstance(table, dict):
            raise InvalidInput(f"Config key 'models.{name}' in {path} must be a table.")
        validate_model_name(name, what=f"model table name in {path}")
    return dict(data)


def _proxy_settings(data: Mapping[str, Any], listen: str | None, environ: Mapping[str, str],
                    where: str) -> ProxySettings:
    proxy = data.get("proxy", {})
    given: dict[str, Any] = {}
    listen = listen or proxy.get("listen")
    if listen:
        given["listen_host"], given["listen_port"] = parse_listen(listen)
    keys = proxy.get("api_keys", [])
    if not all(isinstance(k, str) and k for k in keys):
        raise InvalidInput(f"Config key 'proxy.api_keys'{where} must be a list of non-empty strings.")
    if environ.get("GPUD_API_KEY"):
        keys = [environ["GPUD_API_KEY"], *keys]
    given["api_keys"] = tuple(keys)
    if "max_body" in proxy:
        given["max_body_bytes"] = parse_size(proxy["max_body"], what=f"proxy.max_body{where}")
    for key in ("idle_timeout_sec", "client_timeout_sec", "wake_timeout_sec"):
        if key in proxy:
            if not 0 < proxy[key] < math.inf:
                raise InvalidInput(f"Config key 'proxy.{key}'{where} must be a number of seconds more than 0.")
            given[key] = float(proxy[key])
    if "max_connections" in proxy:
        if proxy["max_connections"] < 0:
            raise InvalidInput(f"Config key 'proxy.max_connections'{where} cannot be negative (0: automatic).")
        given["max_connections"] = proxy["max_connections"]
    if "prefix_table_blocks" in proxy:
        if proxy["prefix_table_blocks"] < 1:
            raise InvalidInput(f"Config key 'proxy.prefix_table_blocks'{where} must be at least 1.")
        given["prefix_table_blocks"] = proxy["prefix_table_blocks"]
    if environ.get("GPUD_PROXY_WORKERS"):
        given["workers"] = resolve_workers(environ["GPUD_PROXY_WORKERS"], what="GPUD_PROXY_WORKERS")
    elif "workers" in proxy:
        given["workers"] = resolve_workers(proxy["workers"], what=f"config key 'proxy.workers'{where}")
    if "wake_queue" in proxy:
        if proxy["wake_queue"] < 1:
            raise InvalidInput(f"Config key 'proxy.wake_queue'{where} must be at least 1.")
        given["wake_queue"] = proxy["wake_queue"]
    return ProxySettings(**given)


def _scale_settings(data: Mapping[str, Any], where: str) -> ScaleSettings:
    given = dict(data.get("scale", {}))
    for key, value in given.items():
        if not 0 < value < math.inf:
            raise InvalidInput(f"Config key 'scale.{key}'{where} must be a number of seconds more than 0.")
        given[key] = float(value)
    return ScaleSettings(**given)


def _supervisor_settings(data: Mapping[str, Any], where: str) -> SupervisorSettings:
    given = dict(data.get("supervisor", {}))
    if "restart" in given:
        try:
            given["restart"] = Restart(given["restart"])
        except ValueError:
            raise InvalidInput(
                f"Config key 'supervisor.restart'{where} must be one of {', '.join(r.value for r in Restart)}."
            ) from None
    for key, value in given.items():
        if key != "restart" and value < 0:
            raise InvalidInput(f"Config key 'supervisor.{key}'{where} cannot be negative.")
    return SupervisorSettings(**given)


def _estimate_settings(data: Mapping[str, Any], where: str) -> EstimateSettings:
    table = data.get("estimate", {})
    given: dict[str, Any] = {}
    if "kv_sequences" in table:
        if table["kv_sequences"] < 1:
            raise InvalidInput(f"Config key 'estimate.kv_sequences'{where} must be at least 1.")
        given["kv_sequences"] = table["kv_sequences"]
    if "overhead" in table:
        given["overhead_bytes"] = parse_size(table["overhead"], what=f"estimate.overhead{where}")
    return EstimateSettings(**given)


def load_settings(flags: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> Settings:
    """flags: config, socket, state_dir, gpus, listen (None when not given)."""
    explicit = flags.get("config") or environ.get("GPUD_CONFIG")
    path: Path | None = Path(explicit) if explicit else default_config_path(environ)
    data: dict[str, Any] = {}
    if explicit and path is not None and not path.exists():
        raise InvalidInput(f"Config file {path} does not exist.")
    if path is not None and path.exists():
        data = read_config_file(path)
    else:
        path = None

    def pick(flag: str, env: str, section: str, key: str) -> Any:
        if flags.get(flag) is not None:
            return flags[flag]
        if environ.get(env):
            return environ[env]
        return data.get(section, {}).get(key)

    where = f" in {path}" if path else ""

    given: dict[str, Any] = {"cluster": cluster_settings(data.get("cluster", {}), where)}
    if "headroom" in data.get("gpus", {}):
        given["headroom_bytes"] = parse_size(data["gpus"]["headroom"], what=f"gpus.headroom{where}")
    gpus = pick("gpus", "GPUD_GPUS", "gpus", "spec")
    if gpus is not None:
        given["gpus"] = gpus
    multi = multi_replica_from_env(environ)
    if multi is None:
        multi = data.get("allocator", {}).get("single_gpu_multi_replica")
    if multi is not None:
        given["multi_replica"] = multi
    return Settings(
        config_path=path,
        socket=str(pick("socket", "GPUD_SOCKET", "daemon", "socket") or default_socket_path(environ)),
        socket_group=data.get("daemon", {}).get("socket_group"),
        state_dir=Path(pick("state_dir", "GPUD_STATE_DIR", "daemon", "state_dir") or default_state_dir(environ)),
        proxy=_proxy_settings(data, flags.get("listen") or environ.get("GPUD_LISTEN") or None, environ, where),
        supervisor=_supervisor_settings(data, where),
        estimate=_estimate_settings(data, where),
        scale=_scale_settings(data, where),
        env=dict(data.get("env", {})),
        models={name: dict(table) for name, table in data.get("models", {}).items()},
        **given,
    )
