"""Model operations: start, scale, stop, restart, plan — validated, placed all-or-nothing, then supervised.

The control API calls these; each mutation marks the model busy (`Model.operation`) until it is done, so
clients can wait for exactly that (SPEC §5: start/stop/scale/restart wait until done or failed for good).

This module is the one owner of GPU reservations: it reserves what placement chose, and releases a
replica's reservation when it stopped the replica itself or when the supervisor reports that the replica
ended by itself (`_replica_ended`), in both cases once no process of it is left. A restart keeps it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from gpud.config import Settings
from gpud.control.state import StateStore
from gpud.errors import Conflict, DoesNotFit, GpudError, InvalidInput, NotFound, Unavailable
from gpud.estimate.measured import with_measured
from gpud.estimate.refusal import NEEDS_MODEL
from gpud.estimate.request import resolve
from gpud.gpus.ledger import Ledger, Reservation
from gpud.gpus.placement import PlacementRequest, ReplicaPlacement, place, plan_json
from gpud.registry import Model, Operation, Registry, Replica, ReplicaState
from gpud.spec import MAX_REPLICAS, VRAM_AUTO, ModelSpec
from gpud.supervise.supervisor import Supervisor

log = logging.getLogger(__name__)


def placement_request(spec: ModelSpec, replicas: int, multi_replica: bool) -> PlacementRequest:
    if spec.needs_estimate:  # a bug, not a user error: unestimated "auto" would silently mean whole GPUs
        raise ValueError(f"model {spec.name!r}: vram auto must be estimated before it is placed")
    return PlacementRequest(
        replicas=replicas,
        gpus_per_replica=spec.gpus_per_replica,
        vram_bytes=spec.vram_bytes,
        gpu_idx=spec.gpu_idx,
        policy=spec.placement,
        multi_replica=multi_replica,
    )


class ModelService:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        ledger: Ledger,
        supervisor: Supervisor,
        store: StateStore,
        *,
        prepare: Callable[[Model], Awaitable[None]] | None = None,
        before_stop: Callable[[Model], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.ledger = ledger
        self.supervisor = supervisor
        self.store = store
        # Work done before a model's replicas first start (building its venv); raises GpudError to fail it.
        self.prepare = prepare
        # Awaited when `model stop` begins, while the model still serves (the cluster registrar takes it off
        # the gateway here, SPEC §16); it must not raise, and it bounds its own time.
        self.before_stop = before_stop
        self.declared: set[str] = set()  # models from [models.NAME] tables: not persisted
        # Saved models that could not be started at boot (e.g. they no longer fit): kept in the state file
        # until `model stop NAME`, and tried again at the next boot (SPEC §3: only `model stop` removes state).
        self.unrestored: dict[str, ModelSpec] = {}
        self.closing = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"http://{self.settings.proxy.listen}/v1"

    def get(self, name: str) -> Model:
        model = self.registry.get(name)
        if model is None:
            raise NotFound(f"No model named {name!r} (see `gpud model list`).")
        return model

    def show(self, model: Model) -> dict[str, Any]:
        return with_measured(model.to_json(self.endpoint), self.ledger)

    def _estimated(self, spec: ModelSpec) -> ModelSpec:
        """SPEC §11: a `vram: "auto"` spec with its estimate made from the model's files, read where its
        replicas will look (the daemon's env, then [env], then the model's)."""
        return resolve(spec, self.settings.estimate, daemon_env=os.environ, config_env=self.settings.env)

    # ---- placement ----------------------------------------------------------------------------------
    def _place(self, spec: ModelSpec, replicas: int, first_index: int) -> list[ReplicaPlacement]:
        self.ledger.refresh()
        request = placement_request(spec, replicas, self.settings.multi_replica)
        return place(request, self.ledger.views(), first_index=first_index)

    async def plan(self, body: Any) -> dict[str, Any]:
        if isinstance(body, dict) and "model" not in body:
            if str(body.get("vram")).strip().lower() == VRAM_AUTO:
                raise InvalidInput(NEEDS_MODEL)
            body = {**body, "model": "plan"}
        spec = ModelSpec.from_json(body)
        if spec.needs_estimate:
            spec = await asyncio.to_thread(self._estimated, spec)
        estimate = None if spec.estimate is None else spec.estimate.to_json()
        try:
            placements = self._place(spec, spec.replicas, 0)
        except DoesNotFit as exc:
            return {**(exc.details.get("plan") or plan_json(None, exc.message)), "estimate": estimate}
        return {**plan_json(placements, None), "estimate": estimate}

    # ---- reservations: taken and released here only ---------------------------------------------------
    def _reserve(self, spec: ModelSpec, placements: list[ReplicaPlacement]) -> None:
        self.ledger.reserve([
            Reservation(spec.name, p.index, p.gpus, p.vram_by_gpu, exclusive=spec.vram_bytes is None)
            for p in placements
        ])

    def _release(self, model: str, indices: list[int] | None = None) -> None:
        """Free the memory of these replicas of `model` (every one when `indices` is None)."""
        if indices is None:
            self.ledger.release_model(model)
        for index in indices or ():
            self.ledger.release(model, index)

    def _replica_ended(self, replica: Replica) -> None:
        """The supervisor's report: the replica failed for good or exited for good, and its tree is gone."""
        self._release(replica.model, [replica.index])

    def _launch(self, model: Model, replica: Replica) -> None:
        self.supervisor.launch(model, replica, self._replica_ended)

    # ---- operations ---------------------------------------------------------------------------------
    async def start_model(self, spec: ModelSpec, *, declared: bool = False, restoring: bool = False) -> Model:
        self._check_open()
        if spec.needs_estimate:  # header reads only, but a cold network disk must not stall the loop
            spec = await asyncio.to_thread(self._estimated, spec)
            self._check_open()
        if spec.name in self.registry.models:
            raise Conflict(f"A model named {spec.name!r} is already running; stop it first or pick another --name.")
        placements = self._place(spec, spec.replicas, 0)
        self._reserve(spec, placements)  # all or nothing; nothing else has changed yet
        if not (declared or restoring):
            try:
                self._save({spec.name: spec})
            except GpudError:
                self._release(spec.name)
                raise
        self.unrestored.pop(spec.name, None)
        model = Model(spec)
        for p in placements:
            model.replicas[p.index] = Replica(spec.name, p.index, p.gpus, p.vram_by_gpu)
        self.registry.models[spec.name] = model
        if declared:
            self.declared.add(spec.name)
        self._begin(model, Operation.START, self._run_start(model))
        return model

    async def _run_start(self, model: Model) -> None:
        if self.prepare is not None:
            try:
                await self.prepare(model)
            except Exception as exc:  # the message is the user's answer; nothing stays reserved
                message = getattr(exc, "message", None) or str(exc)
                self._release(model.name)
                for replica in model.replicas.values():
                    self.registry.set_state(replica, ReplicaState.FAILED, message)
                return
        for replica in sorted(model.replicas.values(), key=lambda r: r.index):
            if not model.stopping:
                self._launch(model, replica)
        await self._wait_settled(model)

    async def scale(self, name: str, replicas: int) -> Model:
        model = self.get(name)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= MAX_REPLICAS:
            raise InvalidInput(f"Invalid replicas: expected a whole number from 1 to {MAX_REPLICAS}.")
        self._check_idle(model)
        current = sorted(model.replicas)
        spec = dataclasses.replace(model.spec, replicas=replicas)
        if replicas > len(current):
            first = (current[-1] + 1) if current else 0
            placements = self._place(model.spec, replicas - len(current), first)
            self._reserve(model.spec, placements)
            new = [Replica(name, p.index, p.gpus, p.vram_by_gpu) for p in placements]
            removed: list[int] = []
        else:
            new, removed = [], current[replicas:]
        if name not in self.declared:
            try:
                self._save({name: spec})
            except GpudError:
                self._release(name, [r.index for r in new])
                raise
        model.spec = spec
        self._begin(model, Operation.SCALE, self._run_scale(model, new, removed))
        return model

    async def _run_scale(self, model: Model, new: list[Replica], removed: list[int]) -> None:
        for index in removed:
            self.registry.set_state(model.replicas[index], ReplicaState.STOPPING)
        await asyncio.gather(*(self.supervisor.stop(model.name, i) for i in removed))
        self._release(model.name, removed)
        for index in removed:
            model.replicas.pop(index, None)
        for replica in new:
            model.replicas[replica.index] = replica
            self._launch(model, replica)
        await self._wait_settled(model)

    async def restart(self, name: str, rolling: bool = False) -> Model:
        model = self.get(name)
        self._check_open()
        self._check_idle(model)
        self._begin(model, Operation.RESTART, self._run_restart(model, rolling))
        return model

    async def _run_restart(self, model: Model, rolling: bool) -> None:
        if self.prepare is not None and model.spec.venv_packages and model.venv is None:
            # Its venv build failed before: a restart is the way to try it again.
            try:
                await self.prepare(model)
            except Exception as exc:
                message = getattr(exc, "message", None) or str(exc)
                for replica in model.replicas.values():
                    self.registry.set_state(replica, ReplicaState.FAILED, message)
                return
        # Failed replicas gave their reservation back: place them again first (all of them, or none).
        failed = [r for r in model.replicas.values() if r.state in (ReplicaState.FAILED, ReplicaState.STOPPED)]
        replaced: dict[int, Replica] = {}
        for replica in failed:
            await self.supervisor.stop(model.name, replica.index)
        self._release(model.name, [r.index for r in failed])
        if failed:
            try:
                placements = self._place(model.spec, len(failed), 0)
            except DoesNotFit as exc:
                for replica in failed:
                    self.registry.set_state(replica, ReplicaState.FAILED, exc.message)
                return
            # Keep the replicas' indices; only their GPUs may change.
            placements = [dataclasses.replace(p, index=r.index) for p, r in zip(placements, failed, strict=True)]
            self._reserve(model.spec, placements)
            for p in placements:
                replaced[p.index] = Replica(model.name, p.index, p.gpus, p.vram_by_gpu,
                                            restarts=model.replicas[p.index].restarts)
        others = [r for r in sorted(model.replicas.values(), key=lambda r: r.index) if r.index not in replaced]
        for replica in replaced.values():
            model.replicas[replica.index] = replica
            self._launch(model, replica)
        if rolling:
            for replica in others:
                fresh = await self._restart_one(model, replica)
                await self._wait_settled(model)
                if fresh.state is not ReplicaState.READY:
                    # The new version does not come up: keep the others serving the old one (why --rolling).
                    log.warning("model %s: rolling restart stopped at replica %d (%s)", model.name, fresh.index,
                                fresh.message or fresh.state.value)
                    return
        else:
            await asyncio.gather(*(self._restart_one(model, r) for r in others))
        await self._wait_settled(model)

    async def _restart_one(self, model: Model, replica: Replica) -> Replica:
        # The reservation stays in place across the restart: nobody else can take the memory meanwhile.
        await self.supervisor.stop(model.name, replica.index)
        fresh = Replica(model.name, replica.index, replica.gpus, replica.vram_by_gpu, restarts=replica.restarts)
        model.replicas[replica.index] = fresh
        self._launch(model, fresh)
        return fresh

    async def stop_model(self, name: str) -> Model:
        self._check_open()
        if name in self.unrestored and name not in self.registry.models:
            # Saved but never started in this life (it did not fit at boot): stopping it means forgetting it.
            self._save({name: None})
            spec = self.unrestored.pop(name)
            forgotten = Model(spec, stopping=True)
            self.registry.publish({"type": "removed", "name": name})
            return forgotten
        model = self.get(name)
        if model.operation is Operation.STOP:
            return model
        if name not in self.declared:
            self._save({name: None})
        self.declared.discard(name)
        model.stopping = True
        previous = model.task
        self._begin(model, Operation.STOP, self._run_stop(model, previous))
        return model

    async def _run_stop(self, model: Model, previous: asyncio.Task[None] | None) -> None:
        if previous is not None and not previous.done():
            # A start, scale or restart in progress would otherwise go on launching replicas of a model
            # that is going away. Cancelling is safe: runner stops are shielded and run to their end.
            previous.cancel()
            await asyncio.gather(previous, return_exceptions=True)
        if self.before_stop is not None:
            await self.before_stop(model)
        for replica in model.replicas.values():
            if replica.state not in (ReplicaState.FAILED, ReplicaState.STOPPED):
                self.registry.set_state(replica, ReplicaState.STOPPING)
        await asyncio.gather(*(self.supervisor.stop(model.name, i) for i in list(model.replicas)))
        self._release(model.name)
        if self.registry.models.get(model.name) is model:
            del self.registry.models[model.name]
        self.registry.publish({"type": "removed", "name": model.name})

    async def shutdown(self) -> None:
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.supervisor.shutdown()

    # ---- helpers ------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closing:
            raise Unavailable("The gpud daemon is shutting down.")

    def _check_idle(self, model: Model) -> None:
        if model.stopping:
            raise Conflict(f"Model {model.name!r} is stopping.")
        if model.operation is not None:
            raise Conflict(f"Model {model.name!r} is busy ({model.operation.value}); wait for it to finish.")

    def _begin(self, model: Model, operation: Operation, work: Awaitable[None]) -> None:
        model.operation = operation
        self.registry.changed(model.name)

        async def runner() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("model %s: %s failed", model.name, operation.value)
            finally:
                if model.operation == operation:
                    model.operation = None
                    self.registry.changed(model.name)

        task = asyncio.get_running_loop().create_task(runner(), name=f"{operation.value} {model.name}")
        model.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wait_settled(self, model: Model) -> None:
        queue = self.registry.subscribe()
        try:
            while not (model.stopping or model.settled()):
                await queue.get()
        finally:
            self.registry.unsubscribe(queue)

    def save_now(self) -> None:
        try:
            self._save({})
        except GpudError as exc:
            log.error("%s", exc.message)

    def _save(self, changes: dict[str, ModelSpec | None]) -> None:
        """Write the desired state as it will be after `changes` (name → new spec, or None: removed), before
        anything changes in memory: a write that fails (full disk) leaves both the file and the daemon as they were."""
        specs: dict[str, ModelSpec | None] = {
            m.name: m.spec for m in self.registry if not m.stopping and m.name not in self.declared
        }
        specs.update(self.unrestored)
        specs.update(changes)
        try:
            self.store.save([spec for spec in specs.values() if spec is not None])
        except OSError as exc:
            raise GpudError(f"Cannot save the state under {self.store.path.parent}: {exc.strerror or exc}; "
                            "nothing was changed.") from None
