"""SPEC §12 operations of the model service: unload, load, wake, eviction and load-based scaling.

`DemandOperations` is a part of `ModelService` (gpud.control.service), kept in its own module so that each
file reads as one subject; it uses the service's registry, placer, supervisor and operation machinery
(`_begin`, `_run_start`, `_run_scale`), declared below for the type checker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from gpud.control.placer import ROOM_POLL_SEC, RoomComing
from gpud.demand.room import WAKE_GRACE_SEC
from gpud.errors import DoesNotFit, GpudError, Unavailable
from gpud.registry import Model, Operation, Replica, ReplicaState

if TYPE_CHECKING:
    from gpud.config import Settings
    from gpud.control.placer import Placer
    from gpud.registry import Registry
    from gpud.supervise.supervisor import Supervisor

log = logging.getLogger("gpud.control.service")


class DemandOperations:
    if TYPE_CHECKING:  # what ModelService provides
        settings: Settings
        registry: Registry
        placer: Placer
        supervisor: Supervisor
        closing: bool
        _tasks: set[asyncio.Task[None]]

        def get(self, name: str) -> Model: ...
        def _check_open(self) -> None: ...
        def _check_idle(self, model: Model) -> None: ...
        def _begin(self, model: Model, operation: Operation, work: Awaitable[None]) -> asyncio.Task[None]: ...
        async def _run_start(self, model: Model, evicted: Sequence[Model] = ()) -> None: ...
        async def _run_scale(self, model: Model, new: list[Replica], removed: list[int],
                             evicted: Sequence[Model] = ()) -> None: ...
        def save_now(self) -> None: ...

    async def unload(self, name: str, *, why: str = "unload") -> Model:
        """Make the model idle now: its replicas stop (§7), their memory is released, it wakes on demand."""
        self._check_open()
        model = self.get(name)
        if model.operation is Operation.UNLOAD or (model.idle and not model.replicas):
            return model
        self._check_idle(model)
        self._begin_unload(model, why)
        return model

    async def load(self, name: str) -> Model:
        """`model load`: begin waking an idle model (placing it, evicting if need be) and return; a model
        that is loaded or loading already is returned as it is. DoesNotFit when it cannot be placed."""
        self._check_open()
        model = self.get(name)
        if model.operation is Operation.UNLOAD and model.task is not None and not model.task.done():
            # The unload may take its drain and stop timeouts (a minute): answer now, wake it once it is idle.
            self._after(model.task, lambda: self._load_after_unload(model))
            return model
        if model.idle and model.operation is None:
            self._begin_load(model, why="load")
        return model

    def _load_after_unload(self, model: Model) -> None:
        if self.closing or self.registry.models.get(model.name) is not model or not model.idle or model.operation:
            return  # stopped, shut down, or woken by a request meanwhile
        try:
            self._begin_load(model, why="load")
        except GpudError as exc:
            model.message = exc.message  # `model show` says why it stays idle
            log.warning("model %s: cannot load it after its unload: %s", model.name, exc.message)
            self.registry.changed(model.name)

    def _after(self, task: asyncio.Task[None], then: Callable[[], None]) -> None:
        """Call `then()` once `task` has ended (however it ended), from a task of the service's own."""

        async def waiter() -> None:
            await asyncio.wait([task])
            then()

        follow = asyncio.get_running_loop().create_task(waiter())
        self._tasks.add(follow)
        follow.add_done_callback(self._tasks.discard)

    async def wake(self, name: str) -> Model:
        """Wake for a request: returns once a replica of the model is ready. Idempotent: however many callers,
        one wake; a caller that goes away (is cancelled) does not cancel it. Raises DoesNotFit with the
        placement's reason when the model cannot be placed even after eviction (it stays idle), and
        Unavailable when the wake fails or the model is stopped meanwhile.

        When the models to evict for it are in use right now (requests in flight, loading, just woken), it
        waits for them, up to `proxy.wake_timeout_sec`: the requests waiting for this wake would rather be
        answered late than be refused while room is about to come (gpud.demand.room)."""
        deadline = time.monotonic() + self.settings.proxy.wake_timeout_sec
        while True:
            self._check_open()
            model = self.get(name)
            if model.ready_replicas():
                return model
            if model.operation is Operation.UNLOAD and model.task is not None:
                await asyncio.wait([model.task])  # not cancelled if this caller is
                continue
            if model.idle and model.operation is None:
                try:
                    self._begin_load(model, why="request")
                except RoomComing as exc:
                    if time.monotonic() >= deadline:
                        raise DoesNotFit(exc.message, details=exc.details) from None
                    await asyncio.sleep(ROOM_POLL_SEC)  # in-flight counts change without an event
                    continue
            elif model.operation is None:
                raise Unavailable(f"Model {name!r} has no ready replica ({model.state().value}).")
            await self._first_ready(model)
            return model

    async def autoscale(self, name: str, to: int, why: str) -> None:
        """Load-based scaling (gpud.demand.scale decided it): one replica more or less, never evicting, not
        saved (a restart or a wake comes back with the floor). DoesNotFit when the new replica has no room."""
        model = self.get(name)
        if model.idle or model.stopping or model.operation is not None:
            return
        current = sorted(model.replicas)
        new: list[Replica] = []
        removed: list[int] = []
        if to > len(current):
            placements = self.placer.place(model.spec, 1, (current[-1] + 1) if current else 0)
            self.placer.reserve(model.spec, placements)
            new = [Replica(name, p.index, p.gpus, p.vram_by_gpu) for p in placements]
        elif to < len(current) and len(current) > model.spec.replicas:
            removed = current[-1:]  # the highest index, drained by the stop
        else:
            return
        before, model.desired = model.desired, len(current) + len(new) - len(removed)
        log.info("model %s: %d → %d replicas (%s)", name, before, model.desired, why)
        self.registry.publish({"type": "scaled", "name": name, "from": before, "to": model.desired, "why": why})
        self._begin(model, Operation.SCALE, self._run_scale(model, new, removed))

    def _evict(self, victims: Sequence[Model], *, needed_by: Model) -> Sequence[Model]:
        """Begin unloading the models the planner chose for `needed_by`; `_gone(victims)` waits for them."""
        for victim in victims:
            log.info("model %s: evicted to make room for %s", victim.name, needed_by.name)
            self.registry.publish({"type": "evicted", "name": victim.name, "by": needed_by.name})
            self._begin_unload(victim, "evicted")
        return victims

    def _begin_unload(self, model: Model, why: str) -> asyncio.Task[None]:
        # Out of the balancer now, in this same step: no request may be routed to it from here on.
        for replica in model.replicas.values():
            if replica.state not in (ReplicaState.FAILED, ReplicaState.STOPPED):
                self.registry.set_state(replica, ReplicaState.STOPPING)
        return self._begin(model, Operation.UNLOAD, self._run_unload(model, why))

    async def _run_unload(self, model: Model, why: str) -> None:
        await asyncio.gather(*(self.supervisor.stop(model.name, i) for i in list(model.replicas)))
        self.placer.release(model.name)
        model.replicas.clear()
        model.idle = True
        model.desired = model.spec.replicas  # it comes back with its floor
        model.loaded_at = None
        log.info("model %s: idle (%s)", model.name, why)
        self.save_now()
        self.registry.publish({"type": "idle", "name": model.name, "why": why})

    def _begin_load(self, model: Model, why: str) -> None:
        """Place an idle model (evicting if need be) and start its replicas; DoesNotFit with nothing changed."""
        self._check_open()
        spec = model.spec
        placements, victims = self.placer.make_room(spec, spec.replicas, 0, waiting=why == "request")
        self.placer.reserve(spec, placements, victims)
        model.idle = False
        model.desired = spec.replicas
        model.message = None
        for p in placements:
            model.replicas[p.index] = Replica(spec.name, p.index, p.gpus, p.vram_by_gpu)
        log.info("model %s: waking (%s)", model.name, why)
        self.registry.publish({"type": "wake", "name": model.name, "why": why})
        evicted = self._evict(victims, needed_by=model)
        self.save_now()
        self._begin(model, Operation.LOAD, self._run_load(model, evicted, for_requests=why == "request"))

    async def _run_load(self, model: Model, evicted: Sequence[Model], *, for_requests: bool) -> None:
        await self._run_start(model, evicted)
        if model.ready_replicas() and for_requests:
            model.evict_after = time.time() + WAKE_GRACE_SEC  # its waiting requests are on their way
        if model.ready_replicas() or model.stopping:
            return
        # Not one replica came up: back to idle with the reason, so that the next request tries again.
        failure = next((r.message for r in model.replicas.values() if r.message), None)
        await asyncio.gather(*(self.supervisor.stop(model.name, i) for i in list(model.replicas)))
        self.placer.release(model.name)
        model.replicas.clear()
        model.idle = True
        model.message = f"The last load failed: {(failure or 'no replica became ready').rstrip('.')}."
        log.warning("model %s: %s", model.name, model.message)
        self.save_now()
        self.registry.publish({"type": "idle", "name": model.name, "why": "load failed"})

    async def _first_ready(self, model: Model) -> None:
        """Wait until a replica of `model` is ready; Unavailable when its operation ends without one."""
        queue = self.registry.subscribe()
        try:
            while not model.ready_replicas():
                self._check_open()
                if model.stopping or self.registry.models.get(model.name) is not model:
                    raise Unavailable(f"Model {model.name!r} was stopped while it was loading.")
                if model.operation is None:
                    reason = model.message or f"Model {model.name!r} has no ready replica ({model.state().value})."
                    raise Unavailable(reason)
                await queue.get()
        finally:
            self.registry.unsubscribe(queue)

    async def _gone(self, evicted: Sequence[Model]) -> None:
        """Wait until no process of the evicted models is left: their unloads, or what took an unload's place
        (a `model stop` cancels it and stops the replicas itself). Cancelling this waiter leaves them running."""
        for victim in evicted:
            # Not a load that may follow (a request for the victim): that is not its processes going away.
            while (victim.operation in (Operation.UNLOAD, Operation.STOP) and (task := victim.task) is not None
                   and not task.done()):
                await asyncio.wait([task])
