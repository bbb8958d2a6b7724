"""Pure formatting of control-API JSON for people: tables, exit statuses, progress lines. No I/O here.

Every `format_*` takes the API object (SPEC §5 shapes) and returns a string without a trailing newline.
Missing optional keys render as "-" so an older or newer daemon never breaks the display.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Mapping, Sequence
from typing import Any

from gpud.exits import describe_exit
from gpud.units import format_size


def short_exit(last_exit: Mapping[str, Any] | None) -> str:
    """The LAST EXIT column: `code 1`, `SIGKILL`, or `-`."""
    if not last_exit:
        return "-"
    if last_exit.get("signal"):
        return str(last_exit["signal"])
    if last_exit.get("code") is not None:
        return f"code {last_exit['code']}"
    return "?"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns two spaces apart, like `docker ps`; the last column is not padded."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _size(value: Any) -> str:
    return format_size(int(value)) if isinstance(value, int) and not isinstance(value, bool) else "-"


def _gpus(gpus: Any) -> str:
    return ",".join(str(g) for g in gpus) if gpus else "-"


def _gpu_phrase(gpus: Sequence[int]) -> str:
    return ("GPU " if len(gpus) == 1 else "GPUs ") + ",".join(str(g) for g in gpus)


def format_duration(seconds: float) -> str:
    """`3d 4h`, `1h 2m`, `5m 3s`, `42s`: the two largest units, like `docker ps` uptimes."""
    total = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if total >= size or (unit == "s" and not parts):
            parts.append(f"{total // size}{unit}")
            total %= size
    return " ".join(parts[:2])


def _when(value: Any) -> str:
    """A timestamp as local time; epoch seconds or an ISO string (shown as given)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(value))
    return str(value) if value else "-"


# ---- models ------------------------------------------------------------------------------------------


def format_model_list(body: Mapping[str, Any], now: float | None = None) -> str:
    """The `model list` table; `now` (epoch s, default the clock) is what LAST REQUEST counts back from."""
    models = body.get("models") or []
    if not models:
        return "No models are running."
    # The LAST REQUEST column only when a model follows demand (SPEC §12): it tells which one goes idle next.
    demand = any(m.get("idle_timeout_sec") or m.get("on_demand") or m.get("max_replicas") for m in models)
    rows = [
        [
            m.get("name"),
            m.get("engine"),
            m.get("state"),
            f"{m.get('replicas_ready', 0)}/{m.get('replicas_desired', 0)}",
            *([_ago(m.get("last_request_at"), now)] if demand else []),
            m.get("endpoint"),
        ]
        for m in models
    ]
    headers = ["NAME", "ENGINE", "STATE", "READY", *(["LAST REQUEST"] if demand else []), "ENDPOINT"]
    return table(headers, rows)


def _ago(iso: Any, now: float | None = None) -> str:
    """`5m 3s ago` for an ISO 8601 timestamp (the API's last_request_at), `-` for none."""
    if not isinstance(iso, str):
        return "-"
    try:
        when = datetime.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return iso
    return f"{format_duration((time.time() if now is None else now) - when)} ago"


def _demand_fields(show: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """SPEC §12 lines of `model show`, only for what is set."""
    fields: list[tuple[str, Any]] = []
    timeout = show.get("idle_timeout_sec")
    if isinstance(timeout, (int, float)) and timeout > 0:
        fields.append(("Idle timeout", format_duration(timeout)))
    if show.get("on_demand"):
        fields.append(("On demand", "yes (loaded by the first request)"))
    if show.get("max_replicas") is not None:
        floor = show.get("min_replicas", "-")
        fields.append(("Scaling", f"{floor}-{show['max_replicas']} replicas, "
                                  f"{show.get('target_inflight', '-')} in flight per replica"))
    if show.get("last_request_at") or timeout or show.get("on_demand"):
        fields.append(("Last request", _ago(show.get("last_request_at"))))
    if show.get("message"):
        fields.append(("Note", show["message"]))
    return fields


def replica_failure(replica: Mapping[str, Any]) -> str:
    """Why a replica is not running, as a clause: its message, else its decoded last exit."""
    message = replica.get("message")
    last = replica.get("last_exit")
    exit_text = describe_exit(last.get("code"), last.get("signal")) if last else None
    if message and exit_text and exit_text not in message:
        return f"{message.rstrip('.')} (last exit: {exit_text})"
    return str(message or exit_text or "no reason was given").rstrip(".")


def format_model_show(show: Mapping[str, Any]) -> str:
    state = str(show.get("state", "-"))
    if show.get("busy"):
        state += ", an operation is in progress"
    fields = [
        ("Name", show.get("name")),
        ("Model", show.get("model")),
        ("Engine", show.get("engine")),
        ("State", state),
        ("Ready", f"{show.get('replicas_ready', 0)}/{show.get('replicas_desired', 0)} replicas"),
        ("Endpoint", show.get("endpoint")),
        *_demand_fields(show),
    ]
    if show.get("routing") not in (None, "least-conn"):
        fields.append(("Routing", show.get("routing")))
    env = show.get("env") or {}
    if env:
        fields.append(("Env", " ".join(f"{k}={v}" for k, v in env.items())))
    if show.get("unset_env"):
        fields.append(("Unset env", " ".join(show["unset_env"])))
    venv = show.get("venv")
    if venv:
        packages = " ".join(venv.get("packages") or [])
        fields.append(("Venv", f"{venv.get('path', '-')}" + (f" ({packages})" if packages else "")))
    if show.get("args"):
        fields.append(("Engine args", " ".join(show["args"])))
    est = show.get("estimate")
    if est:
        kv = (est.get("kv_bytes_per_token") or 0) * (est.get("context_tokens") or 0) * (est.get("sequences") or 0)
        fields.append(("Estimate", f"{_size(est.get('per_gpu_bytes'))} per GPU (--vram auto): weights "
                                   f"{_size(est.get('weights_bytes'))} + KV {_size(kv)} ({est.get('context_tokens')} "
                                   f"tokens × {est.get('sequences')} sequences), overhead "
                                   f"{_size(est.get('overhead_bytes'))}"))
    width = max(len(k) for k, _ in fields) + 3  # two spaces after the longest "Key:"
    lines = [f"{k + ':':<{width}}{'-' if v is None else v}" for k, v in fields]
    replicas = show.get("replicas") or []
    if replicas:
        # What the replicas really use (NVML only): a column only when some figure is known.
        measured = any(r.get("measured_bytes") is not None for r in replicas)
        rows = [
            [
                r.get("index"),
                r.get("state"),
                r.get("pid"),
                _gpus(r.get("gpus")),
                _size(r.get("vram_bytes")),
                *([_size(r.get("measured_bytes"))] if measured else []),
                r.get("port") or "-",
                r.get("restarts", 0),
                r.get("inflight", 0),
                short_exit(r.get("last_exit")),
            ]
            for r in replicas
        ]
        headers = ["INDEX", "STATE", "PID", "GPUS", "VRAM", *(["USED"] if measured else []), "PORT", "RESTARTS",
                   "INFLIGHT", "LAST EXIT"]
        lines += ["", table(headers, rows)]
        notes = [
            f"replica {r.get('index')}: {replica_failure(r)}"
            for r in replicas
            if r.get("state") in ("failed", "backoff", "unhealthy") and (r.get("message") or r.get("last_exit"))
        ]
        if notes:
            lines += [""] + notes
    return "\n".join(lines)


def failed_replicas(show: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [r for r in show.get("replicas") or [] if r.get("state") == "failed"]


def failure_sentence(show: Mapping[str, Any]) -> str | None:
    """The one sentence a failed start/scale/restart ends with, or None when nothing failed for good."""
    failed = failed_replicas(show)
    name = show.get("name")
    if failed:
        first = failed[0]
        more = f" ({len(failed) - 1} more failed too)" if len(failed) > 1 else ""
        return f"Model {name!r} replica {first.get('index')} failed: {replica_failure(first)}{more}."
    if show.get("state") == "failed":
        return f"Model {name!r} failed."
    return None


# ---- progress ----------------------------------------------------------------------------------------


def _replica_detail(replica: Mapping[str, Any]) -> str:
    state = replica.get("state")
    parts: list[str] = []
    if replica.get("gpus"):
        parts.append(_gpu_phrase(replica["gpus"]))
    if replica.get("port") and state in ("starting", "ready"):
        parts.append(f"port {replica['port']}")
    if state in ("failed", "backoff", "unhealthy") and (replica.get("message") or replica.get("last_exit")):
        parts.append(replica_failure(replica))
    return f" ({', '.join(parts)})" if parts else ""


def replica_change(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> str | None:
    """One progress line for a replica whose state changed, e.g. `replica 1: starting → ready (GPU 1, port 41234)`."""
    if new is None:
        return None if old is None else f"replica {old.get('index')}: removed"
    state = new.get("state")
    if old is not None and old.get("state") == state:
        return None
    arrow = state if old is None else f"{old.get('state')} → {state}"
    return f"replica {new.get('index')}: {arrow}{_replica_detail(new)}"


def replica_changes(previous: Mapping[int, Mapping[str, Any]], show: Mapping[str, Any]) -> list[str]:
    """Progress lines between the replicas seen before (by index) and a new model show object."""
    current = {r.get("index"): r for r in show.get("replicas") or []}
    lines = []
    for index in sorted(set(previous) | set(current), key=lambda i: (i is None, i)):
        line = replica_change(previous.get(index), current.get(index))
        if line:
            lines.append(line)
    return lines


DEMAND_EVENTS = ("idle", "wake", "evicted", "scaled")


def demand_event(event: Mapping[str, Any]) -> str:
    """One progress line for a SPEC §12 event (idle, wake, evicted, scaled)."""
    kind, name = event.get("type"), event.get("name")
    if kind == "evicted":
        return f"evicting {name} (idle, least recently used) to make room for {event.get('by')}"
    if kind == "wake":
        return f"{name}: waking ({event.get('why') or 'asked'})"
    if kind == "idle":
        return f"{name}: idle ({event.get('why') or 'unloaded'})"
    return f"{name}: {event.get('from')} → {event.get('to')} replicas ({event.get('why') or 'load'})"


# ---- GPUs, plans, status, venvs ----------------------------------------------------------------------


def _hosted(replica: Mapping[str, Any]) -> str:
    """`demo#0`, and on NVML what it really uses of its reservation there: `demo#0 (used 9.1 of 10 GiB)`."""
    name = f"{replica.get('model')}#{replica.get('index')}"
    if replica.get("measured_bytes") is None:
        return name
    return f"{name} (used {_size(replica.get('measured_bytes'))} of {_size(replica.get('reserved_bytes'))})"


def format_gpus(body: Mapping[str, Any]) -> str:
    gpus = body.get("gpus") or []
    if not gpus:
        return "No GPUs."
    rows = []
    notes = []
    for g in gpus:
        hosted = " ".join(_hosted(r) for r in g.get("replicas") or []) or "-"
        rows.append(
            [
                g.get("index"),
                g.get("name"),
                _size(g.get("total_bytes")),
                _size(g.get("used_by_others_bytes")),
                _size(g.get("reserved_bytes")),
                _size(g.get("available_bytes")),
                hosted,
            ]
        )
        if g.get("ok") is False:
            notes.append(f"GPU {g.get('index')} is not usable: {g.get('reason') or 'no reason was given'}.")
    headers = ["INDEX", "NAME", "TOTAL", "USED-BY-OTHERS", "RESERVED", "AVAILABLE", "REPLICAS"]
    text = table(headers, rows)
    return text + ("\n\n" + "\n".join(notes) if notes else "")


def _bytes(value: Any) -> str:
    return f"{value:,} bytes" if isinstance(value, int) and not isinstance(value, bool) else "-"


def format_estimate(est: Mapping[str, Any]) -> str:
    """The `--vram auto` breakdown (SPEC §11) as a table: each part, its size and where it comes from."""
    gpus = est.get("gpus_per_replica") or 1
    kv_bytes = None
    if all(isinstance(est.get(k), int) for k in ("kv_bytes_per_token", "context_tokens", "sequences")):
        kv_bytes = est["kv_bytes_per_token"] * est["context_tokens"] * est["sequences"]
    per_token = (f"{_size(est.get('kv_bytes_per_token'))}/token (2 × {est.get('layers', '-')} layers × "
                 f"{est.get('kv_heads', '-')} KV heads × {est.get('head_dim', '-')} × "
                 f"{est.get('kv_dtype_bytes', '-')} B)")
    context = f"{est.get('context_tokens', '-')} tokens ({est.get('context_from') or '-'})"
    sequences = est.get("sequences", "-")
    split = f" ÷ {gpus} GPUs" if gpus != 1 else ""
    rows = [
        ["weights", _size(est.get("weights_bytes")), f"{_bytes(est.get('weights_bytes'))}: the tensors in the "
                                                     f"{est.get('format') or '-'} headers"],
        ["KV cache", _size(kv_bytes), f"{per_token} × {context} × {sequences} sequences"],
        ["overhead", _size(est.get("overhead_bytes")), "per GPU: CUDA context, activations, graphs"],
        ["per GPU", _size(est.get("per_gpu_bytes")),
         f"(weights + KV cache){split} + overhead, rounded up to a MiB"],
    ]
    head = f"Estimate (--vram auto) from {est.get('source') or '-'}:"
    return "\n".join([head, "", table(["PART", "SIZE", "HOW"], rows)])


def format_plan(plan: Mapping[str, Any]) -> str:
    estimate = plan.get("estimate")
    if estimate:
        rest = format_plan({k: v for k, v in plan.items() if k != "estimate"})
        return format_estimate(estimate) + "\n\n" + rest
    if not plan.get("fits"):
        return f"Does not fit: {plan.get('reason') or 'no reason was given'}"
    replicas = plan.get("replicas") or []
    rows = [[r.get("index"), _gpus(r.get("gpus")), _size(r.get("vram_bytes"))] for r in replicas]
    by_gpu: dict[int, list[str]] = {}
    for r in replicas:
        for g in r.get("gpus") or []:
            by_gpu.setdefault(g, []).append(str(r.get("index")))
    summary = "; ".join(
        f"GPU {g} hosts {'replica' if len(ids) == 1 else 'replicas'} {', '.join(ids)}" for g, ids in sorted(by_gpu.items())
    )
    head = f"Fits: {len(replicas)} {'replica' if len(replicas) == 1 else 'replicas'}."
    return "\n".join([head, "", table(["REPLICA", "GPUS", "VRAM"], rows), "", summary + "."])


def format_status(status: Mapping[str, Any]) -> str:
    uptime = status.get("uptime_sec")
    fields = [
        ("Version", status.get("version")),
        ("Uptime", format_duration(uptime) if isinstance(uptime, (int, float)) else None),
        ("Socket", status.get("socket")),
        ("Proxy", status.get("proxy")),
        ("GPUs", status.get("gpus_spec")),
        (
            "Models",
            f"{status.get('models', 0)} ({status.get('replicas', 0)} replicas, {status.get('ready', 0)} ready)",
        ),
    ]
    cluster = status.get("cluster")
    if isinstance(cluster, Mapping):
        fields += _cluster_fields(cluster)
    width = max(len(k) for k, _ in fields) + 3  # two spaces after the longest "Key:"
    return "\n".join(f"{k + ':':<{width}}{'-' if v is None else v}" for k, v in fields)


def _cluster_fields(cluster: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """`gpud status` lines for SPEC §16: the gateway, how the last sync went, this node's workers."""
    last = cluster.get("last_sync") or {}
    age = last.get("age_sec")
    when = f", {format_duration(age)} ago" if isinstance(age, (int, float)) else ""
    if last.get("ok") is None:
        sync = "not synced yet"
    elif last.get("ok"):
        sync = f"last sync ok{when}"
    else:
        sync = f"last sync failed{when}: {last.get('error') or 'no reason was given'}"
    workers = cluster.get("workers") or []
    listed = ", ".join(f"{w.get('model')} ({w.get('status')})" for w in workers) or "none"
    return [("Gateway", f"{cluster.get('gateway')} ({sync})"), ("Advertised", cluster.get("advertise")),
            ("Workers", listed)]


def format_venvs(body: Mapping[str, Any]) -> str:
    venvs = body.get("venvs") or []
    if not venvs:
        return "No virtualenvs."
    rows = [
        [
            str(v.get("key", "-"))[:12],
            " ".join(v.get("packages") or []) or "-",
            _size(v.get("size_bytes")),
            _when(v.get("last_used")),
            " ".join(v.get("models") or []) or "-",
            v.get("path"),
        ]
        for v in venvs
    ]
    return table(["KEY", "PACKAGES", "SIZE", "LAST USED", "MODELS", "PATH"], rows)


def format_prune(body: Mapping[str, Any]) -> str:
    removed = body.get("removed") or []
    if not removed:
        return "No unused virtualenvs to remove."
    noun = "virtualenv" if len(removed) == 1 else "virtualenvs"
    return "\n".join([f"Removed {len(removed)} unused {noun}:"] + [f"  {p}" for p in removed])
