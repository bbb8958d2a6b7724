"""The asyncio shell of SPEC §12: samples the registry, lets the pure parts decide, asks the service to act.

- Idle timers (gpud.demand.idle): a loaded model whose idle timeout has passed is unloaded.
- Load-based scaling (gpud.demand.scale): one replica more or less per decision, never evicting.

Wakes are not here: a proxy worker asks the daemon for one (gpud.proxy.workers), which runs the service's
idempotent `wake` and tells the workers of a failure; readiness reaches them with the route table.

Demand is read only from the registry — each replica's `inflight` and each model's `last_request_at`, both
kept by the proxy — so this works the same whoever runs the proxy (in process or in workers whose counts
the daemon copies into the registry).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gpud.config import ScaleSettings
from gpud.control.service import ModelService
from gpud.demand import idle
from gpud.demand.scale import ScaleController, ScaleView
from gpud.errors import DoesNotFit, GpudError
from gpud.registry import Model, Registry, ReplicaState

log = logging.getLogger(__name__)

# How often demand is sampled. Idle timeouts and [scale] windows are seconds to hours; a quarter second
# keeps their error small at a negligible cost (a pass over the models, no I/O).
TICK_SEC = 0.25


def idle_view(model: Model) -> idle.IdleView:
    return idle.IdleView(
        name=model.name,
        timeout_sec=model.spec.idle_timeout_sec,
        loaded_at=model.loaded_at if model.ready_replicas() else None,
        last_request_at=model.last_request_at,
        inflight=model.inflight(),
        busy=model.operation is not None or model.stopping or model.idle,
    )


def scale_view(model: Model) -> ScaleView | None:
    ceiling = model.spec.max_replicas
    if ceiling is None or model.idle:
        return None
    return ScaleView(
        name=model.name,
        floor=model.spec.replicas,
        ceiling=ceiling,
        target_inflight=model.spec.target_inflight,
        replicas=len(model.replicas),
        ready_inflight=[r.inflight for r in model.replicas.values() if r.state is ReplicaState.READY],
        busy=model.operation is not None or model.stopping,
    )


class DemandLoop:
    """Every TICK_SEC: unload models idle past their timeout, scale models by load."""

    def __init__(self, registry: Registry, service: ModelService, scale: ScaleSettings,
                 *, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.service = service
        self.clock = clock
        self.scaler = ScaleController(scale.up_after_sec, scale.down_after_sec)
        self._blocked: set[str] = set()  # models whose last scale-up did not fit (logged once)
        self.last_tick_at: float | None = None  # the clock of the last pass that ran (what a test waits on)

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a bug in one pass must not end idle unloads and scaling for good
                log.exception("the demand loop's pass failed; the next one runs in %g s", TICK_SEC)
            await asyncio.sleep(TICK_SEC)

    async def tick(self) -> None:
        now = self.last_tick_at = self.clock()
        models = list(self.registry)
        for name in idle.due([idle_view(m) for m in models if m.spec.idle_timeout_sec > 0], now):
            try:
                await self.service.unload(name, why="timeout")
            except GpudError as exc:  # it changed meanwhile (stopped, busy): the next tick sees it again
                log.debug("model %s: not unloaded: %s", name, exc.message)
        for model in models:
            view = scale_view(model)
            if view is None:
                self.scaler.forget(model.name)
                continue
            decision = self.scaler.observe(view, now)
            if decision is None:
                continue
            try:
                await self.service.autoscale(model.name, decision.to, decision.why)
                self._blocked.discard(model.name)
            except DoesNotFit as exc:
                if model.name not in self._blocked:
                    log.info("model %s: no room for another replica (%s)", model.name, exc.message)
                    self._blocked.add(model.name)
            except GpudError as exc:
                log.debug("model %s: not scaled: %s", model.name, exc.message)
        for name in set(self.scaler.known()) - {m.name for m in models}:
            self.scaler.forget(name)
