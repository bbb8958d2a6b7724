"""What the dashboard relays where, and how daemon data becomes page events: pure functions, no I/O.

The page talks only to `gpud ui`; `gpud ui` talks only to the control API. `/api/v1/…` requests are passed
to the control socket unchanged — method, path (still URL-encoded, so `Qwen%2FQwen2.5-7B` stays one name)
and JSON body — but only on the routes listed here: the reads the page needs and the changes it offers
(start, scale, stop, restart, unload, load). Everything else is 404 before it reaches the daemon. The
daemon validates every change and its answer (status and error message) comes back as it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from gpud.exits import describe_exit

API_PREFIX = "/api"
_NAME = r"[^/?#]+"
# (method, control-API path pattern) pairs the page may use. Unload and load are SPEC §12 routes.
ALLOWED: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (method, re.compile(pattern))
    for method, pattern in (
        ("GET", r"/v1/status"),
        ("GET", r"/v1/gpus"),
        ("GET", r"/v1/models"),
        ("POST", r"/v1/models"),
        ("GET", rf"/v1/models/{_NAME}"),
        ("PATCH", rf"/v1/models/{_NAME}"),
        ("DELETE", rf"/v1/models/{_NAME}"),
        ("POST", rf"/v1/models/{_NAME}/(?:restart|unload|load)"),
    )
)


def control_path(method: str, raw_path: str) -> str | None:
    """The control-API path for a page request to `raw_path` (as sent, still encoded), or None if the page
    may not use it. The query string is never passed on: none of these routes takes one."""
    if not raw_path.startswith(API_PREFIX + "/"):
        return None
    path = raw_path[len(API_PREFIX):].split("?", 1)[0]
    if any(segment in (".", "..", "%2e", "%2E", "%2e%2e", "%2E%2E") for segment in path.split("/")):
        return None
    for allowed_method, pattern in ALLOWED:
        if method.upper() == allowed_method and pattern.fullmatch(path):
            return path
    return None


def decorate_show(show: Any) -> Any:
    """A `model show` object with each replica's last exit in words (`last_exit_text`), so the page says
    "killed by SIGKILL (out of memory? …)" exactly as the CLI does, from the one home of those phrases."""
    if not isinstance(show, dict) or not isinstance(show.get("replicas"), list):
        return show
    replicas = []
    for replica in show["replicas"]:
        last = replica.get("last_exit") if isinstance(replica, dict) else None
        if isinstance(last, dict):
            replica = {**replica, "last_exit_text": describe_exit(last.get("code"), last.get("signal"))}
        replicas.append(replica)
    return {**show, "replicas": replicas}


def decorate_models(body: Any) -> Any:
    """A `model list` body with every model decorated."""
    if isinstance(body, dict) and isinstance(body.get("models"), list):
        return {**body, "models": [decorate_show(m) for m in body["models"]]}
    return body


def page_event(event: Mapping[str, Any]) -> tuple[str, Any] | None:
    """A /v1/events line → (SSE event name, data) for the page; None for events the relay handles itself
    (`shutdown`: the daemon is going away) or that carry nothing.

    `model` and `removed` keep the page's models current; anything else (venv build progress, and the
    idle/wake/evicted/scaled events of SPEC §12) goes to the page's activity list as a `notice`.
    """
    kind = event.get("type")
    if kind == "model" and isinstance(event.get("model"), dict):
        return "model", decorate_show(event["model"])
    if kind == "removed" and isinstance(event.get("name"), str):
        return "removed", {"name": event["name"]}
    if kind in ("shutdown", "changed", None):
        return None
    return "notice", dict(event)


def model_changes(sent: Mapping[str, Any], models: Iterable[Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Compare the models last sent to the page with a fresh `model list`: (changed or new shows, removed
    names). The periodic refresh sends only these, so an unchanged box sends nothing."""
    current: dict[str, dict[str, Any]] = {}
    for show in models:
        if isinstance(show, dict) and isinstance(show.get("name"), str):
            current[show["name"]] = show
    changed = [show for name, show in current.items() if sent.get(name) != show]
    removed = [name for name in sent if name not in current]
    return changed, removed


def sse_frame(event: str, data: Any) -> bytes:
    """One Server-Sent Event. JSON escapes every line break, so the data is always one `data:` line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def error_body(code: str, message: str) -> dict[str, Any]:
    """The control API's error shape, for errors `gpud ui` itself answers (daemon unreachable, bad route)."""
    return {"error": {"code": code, "message": message}}
