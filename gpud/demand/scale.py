"""Load-based replicas (SPEC §12): the decisions, as a pure state machine fed with samples of in-flight counts.

Up: when every ready replica has at least `target_inflight` requests in flight in every sample for
`up_after_sec` in a row, add one replica (the caller places it without evicting anything, up to
`max_replicas`). Down: when a model runs more replicas than its floor (`replicas`, what a start or a
`model scale` asked for) and has had fewer than target × (ready − 1) requests in flight for `down_after_sec`
in a row, remove one (the caller removes the highest index, drained). One change at a time: while the model
is busy or one of its replicas is not ready, nothing is decided and both clocks start again.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


class Direction(str, enum.Enum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class ScaleView:
    """One sample of a model that may scale by load."""

    name: str
    floor: int  # spec.replicas: never fewer
    ceiling: int  # max_replicas: never more
    target_inflight: int
    replicas: int  # replicas it runs now (any state)
    ready_inflight: Sequence[int]  # in-flight count of each ready replica
    busy: bool  # an operation is in progress


@dataclass(frozen=True)
class ScaleDecision:
    name: str
    direction: Direction
    to: int  # the new number of replicas
    why: str  # for the `scaled` event and the log


@dataclass
class _Clocks:
    up_since: float | None = None
    down_since: float | None = None


@dataclass
class ScaleController:
    """Remembers since when each model's condition has held; `observe` returns a decision when one is due."""

    up_after_sec: float
    down_after_sec: float
    _clocks: dict[str, _Clocks] = field(default_factory=dict)

    def observe(self, view: ScaleView, now: float) -> ScaleDecision | None:
        clocks = self._clocks.setdefault(view.name, _Clocks())
        ready = len(view.ready_inflight)
        if view.busy or ready == 0 or ready < view.replicas:
            clocks.up_since = clocks.down_since = None  # one change at a time, judged on a settled model
            return None
        target = view.target_inflight
        total = sum(view.ready_inflight)
        loaded = view.replicas < view.ceiling and all(n >= target for n in view.ready_inflight)
        quiet = view.replicas > view.floor and total < target * (ready - 1)
        clocks.up_since = (now if clocks.up_since is None else clocks.up_since) if loaded else None
        clocks.down_since = (now if clocks.down_since is None else clocks.down_since) if quiet else None
        if clocks.up_since is not None and now - clocks.up_since >= self.up_after_sec:
            clocks.up_since = None
            why = (f"every ready replica had at least {target} requests in flight for {self.up_after_sec:g} s")
            return ScaleDecision(view.name, Direction.UP, view.replicas + 1, why)
        if clocks.down_since is not None and now - clocks.down_since >= self.down_after_sec:
            clocks.down_since = None
            why = (f"fewer than {target * (ready - 1)} requests in flight ({target} x {ready - 1} replicas) "
                   f"for {self.down_after_sec:g} s")
            return ScaleDecision(view.name, Direction.DOWN, view.replicas - 1, why)
        return None

    def forget(self, name: str) -> None:
        """The model went away, or stopped scaling by load: its clocks start again from nothing."""
        self._clocks.pop(name, None)

    def known(self) -> list[str]:
        return list(self._clocks)
