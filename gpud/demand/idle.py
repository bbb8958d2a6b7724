"""Idle timers (SPEC §12): when a loaded model has had no request in flight for its idle timeout. Pure.

The clock of a model starts when it is running (`loaded_at`: its load or wake finished) and starts again
each time its last request in flight ends (`last_request_at`, which the proxy sets when a request begins and
when it ends). While any request is in flight — a stream in progress included — the model is never idle.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class IdleView:
    """What the idle timer needs to know about one loaded model, read from the registry."""

    name: str
    timeout_sec: float  # 0: never idle
    loaded_at: float | None  # when its load finished (None: still loading, or not loaded)
    last_request_at: float | None
    inflight: int  # requests in flight on all of its replicas
    busy: bool  # an operation (start, scale, restart, load, unload, stop) is in progress


def idle_since(view: IdleView) -> float | None:
    """When the model's idle clock started, or None while it is not counting."""
    if view.timeout_sec <= 0 or view.loaded_at is None or view.busy or view.inflight > 0:
        return None
    return max(view.loaded_at, view.last_request_at or 0.0)


def due(views: Iterable[IdleView], now: float) -> list[str]:
    """The models whose idle timeout has passed at `now`, in the order given."""
    names = []
    for view in views:
        since = idle_since(view)
        if since is not None and now - since >= view.timeout_sec:
            names.append(view.name)
    return names
