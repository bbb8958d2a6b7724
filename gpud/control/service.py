"""Model operations: start, scale, stop, restart, plan, and (SPEC §12, in gpud.control.demand_ops) unload,
load, wake and load-based scaling — validated, placed all-or-nothing, then supervised.

The control API calls these; each mutation marks the model busy (`Model.operation`) until it is done, so
clients can wait for exactly that (SPEC §5: start/stop/scale/restart wait until done or failed for good).

GPU reservations are taken and released through `self.placer` only (gpud.control.placer): this module
reserves what placement chose, and releases a replica's reservation when it stopped the replica itself or
when the supervisor reports that the replica ended by itself (`_replica_ended`), in both cases once no
process of it is left. A restart keeps it.

Eviction (start, scale, load and wake; never load-based scaling): when a request does not fit, the placer
names the idle-able models to unload, or none helps and the §4 refusal stands with nothing changed.
Otherwise the request's reservation is taken at once *in place of* theirs (the ledger counts both until
their processes are gone, so nobody else can take the room meanwhile), they are unloaded (§7 stop
sequence, each reservation released once its processes are gone), and only then do the new replicas start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gpud.config import Settings
from gpud.control.demand_ops import DemandOperations
from gpud.control.placer import Placer
from gpud.control.state import DemandRecord, StateStore
from gpud.errors import Conflict, DoesNotFit, GpudError, InvalidInput, NotFound, Unavailable
from gpud.estimate.measured import with_measured
from gpud.estimate.refusal import NEEDS_MODEL
from gpud.estimate.request import resolve
from gpud.gpus.ledger import Ledger
from gpud.gpus.placement import ReplicaPlacement, plan_json
from gpud.registry import Model, Operation, Registry, Replica, ReplicaState
from gpud.spec import MAX_REPLICAS, VRAM_AUTO, ModelSpec
from gpud.supervise.supervisor import Supervisor

log = logging.getLogger(__name__)


class ModelService(DemandOperations):
    """The model operations; those of SPEC §12 (unload, load, wake, eviction, autoscale) are in its part
    gpud.control.demand_ops."""

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
        self.placer = Placer(settings, registry, ledger)
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
            placements = self.placer.place(spec, spec.replicas, 0)
        except DoesNotFit as exc:
            return {**(exc.details.get("plan") or plan_json(None, exc.message)), "estimate": estimate}
        return {**plan_json(placements, None), "estimate": estimate}

    # ---- reservations -------------------------------------------------------------------------------
    def _replica_ended(self, replica: Replica) -> None:
        """The supervisor's report: the replica failed for good or exited for good, and its tree is gone."""
        self.placer.release(replica.model, [replica.index])

    def _launch(self, model: Model, replica: Replica) -> None:
        self.supervisor.launch(model, replica, self._replica_ended)

    # ---- operations ---------------------------------------------------------------------------------
    async def start_model(self, spec: ModelSpec, *, declared: bool = False, restoring: bool = False,
                          idle: bool | None = None, last_request_at: float | None = None) -> Model:
        """Start `spec` (SPEC §5), or register it idle (on-demand, or idle when the daemon last saved it)."""
        self._check_open()
        if spec.needs_estimate:  # header reads only, but a cold network disk must not stall the loop
            spec = await asyncio.to_thread(self._estimated, spec)
            self._check_open()
        if spec.name in self.registry.models:
            raise Conflict(f"A model named {spec.name!r} is already running; stop it first or pick another --name.")
        idle = spec.on_demand if idle is None else idle
        booting = declared or restoring  # a boot places what fits and evicts nothing (it wakes nothing)
        placements: list[ReplicaPlacement] = []
        victims: list[Model] = []
        if idle:
            if not booting:
                self.placer.check_could_fit(spec)
        elif booting:
            placements = self.placer.place(spec, spec.replicas, 0)
        else:
            placements, victims = self.placer.make_room(spec, spec.replicas, 0)
        self.placer.reserve(spec, placements, victims)  # all or nothing; nothing else has changed yet
        if not booting:
            try:
                self._save({spec.name: spec}, idle={spec.name: idle})
            except GpudError:
                self.placer.release(spec.name)
                raise
        self.unrestored.pop(spec.name, None)
        model = Model(spec, idle=idle, last_request_at=last_request_at)
        for p in placements:
            model.replicas[p.index] = Replica(spec.name, p.index, p.gpus, p.vram_by_gpu)
        self.registry.models[spec.name] = model
        if declared:
            self.declared.add(spec.name)
        if idle:
            self.registry.changed(spec.name)
            self.supervisor.shims.warm()  # its wake, when it comes, need not wait for an interpreter
            return model
        evicted = self._evict(victims, needed_by=model)
        self._begin(model, Operation.START, self._run_start(model, evicted))
        return model

    async def _run_start(self, model: Model, evicted: Sequence[Model] = ()) -> None:
        await self._gone(evicted)
        if self.prepare is not None:
            try:
                await self.prepare(model)
            except Exception as exc:  # the message is the user's answer; nothing stays reserved
                message = getattr(exc, "message", None) or str(exc)
                self.placer.release(model.name)
                for replica in model.replicas.values():
                    self.registry.set_state(replica, ReplicaState.FAILED, message)
                return
        for replica in sorted(model.replicas.values(), key=lambda r: r.index):
            if not model.stopping:
                self._launch(model, replica)
        await self._wait_settled(model)

    async def scale(self, name: str, replicas: int) -> Model:
        """`model scale` (SPEC §5); it also sets the floor that load-based scaling never goes below (§12)."""
        model = self.get(name)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= MAX_REPLICAS:
            raise InvalidInput(f"Invalid replicas: expected a whole number from 1 to {MAX_REPLICAS}.")
        ceiling = model.spec.max_replicas
        if ceiling is not None and replicas > ceiling:
            raise InvalidInput(f"Invalid replicas {replicas}: model {name!r} has max_replicas {ceiling}.")
        self._check_idle(model)
        current = sorted(model.replicas)
        spec = dataclasses.replace(model.spec, replicas=replicas)
        new: list[Replica] = []
        removed: list[int] = []
        victims: list[Model] = []
        if model.idle:
            pass  # nothing loaded: the new count is what the next wake places
        elif replicas > len(current):
            first = (current[-1] + 1) if current else 0
            placements, victims = self.placer.make_room(model.spec, replicas - len(current), first)
            self.placer.reserve(model.spec, placements, victims)
            new = [Replica(name, p.index, p.gpus, p.vram_by_gpu) for p in placements]
        else:
            removed = current[replicas:]
        if name not in self.declared:
            try:
                self._save({name: spec})
            except GpudError:
                self.placer.release(name, [r.index for r in new])
                raise
        model.spec = spec
        model.desired = replicas
        if model.idle:
            self.registry.changed(name)
            return model
        evicted = self._evict(victims, needed_by=model)
        self._begin(model, Operation.SCALE, self._run_scale(model, new, removed, evicted))
        return model

    async def _run_scale(self, model: Model, new: list[Replica], removed: list[int],
                         evicted: Sequence[Model] = ()) -> None:
        for index in removed:
            self.registry.set_state(model.replicas[index], ReplicaState.STOPPING)
        await asyncio.gather(*(self.supervisor.stop(model.name, i) for i in removed))
        self.placer.release(model.name, removed)
        for index in removed:
            model.replicas.pop(index, None)
        await self._gone(evicted)
        for replica in new:
            model.replicas[replica.index] = replica
            self._launch(model, replica)
        await self._wait_settled(model)

    async def restart(self, name: str, rolling: bool = False) -> Model:
        model = self.get(name)
        self._check_open()
        self._check_idle(model)
        if model.idle:
            raise Conflict(f"Model {name!r} is idle: nothing runs to restart (`gpud model load {name}` loads it).")
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
        self.placer.release(model.name, [r.index for r in failed])
        if failed:
            placed = self._place_again(model, failed)
            if placed is None:
                return
            replaced = {r.index: r for r in placed}
        others = [r for r in sorted(model.replicas.values(), key=lambda r: r.index) if r.index not in replaced]
        for replica in replaced.values():
            model.replicas[replica.index] = replica
            self._launch(model, replica)
        if rolling:
            for replica in others:
                fresh = await self._restart_one(model, replica)
                await self._wait_replica_settled(model, fresh)  # not the model: another may have failed meanwhile
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
        if self.placer.holds(model.name, replica.index):
            fresh = Replica(model.name, replica.index, replica.gpus, replica.vram_by_gpu, restarts=replica.restarts)
        else:
            # It failed for good while a rolling restart went through the others, and its memory went back:
            # placed again, or failed with the reason, never launched on memory it does not hold.
            placed = self._place_again(model, [replica])
            if placed is None:
                return replica
            [fresh] = placed
        model.replicas[replica.index] = fresh
        self._launch(model, fresh)
        return fresh

    def _place_again(self, model: Model, replicas: list[Replica]) -> list[Replica] | None:
        """Replicas that gave their reservation back, placed and reserved again under their own indices (only
        their GPUs may change), all of them or none: None, each marked failed with the reason, if they do not fit."""
        try:
            placements = self.placer.place(model.spec, len(replicas), 0)
        except DoesNotFit as exc:
            for replica in replicas:
                self.registry.set_state(replica, ReplicaState.FAILED, exc.message)
            return None
        placements = [dataclasses.replace(p, index=r.index) for p, r in zip(placements, replicas, strict=True)]
        self.placer.reserve(model.spec, placements)
        return [Replica(model.name, p.index, p.gpus, p.vram_by_gpu, restarts=r.restarts)
                for p, r in zip(placements, replicas, strict=True)]

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
            try:
                await self.before_stop(model)
            except Exception:  # the stop goes on: the state file has forgotten the model already
                log.exception("model %s: the hook before its stop failed; stopping it anyway", model.name)
        for replica in model.replicas.values():
            if replica.state not in (ReplicaState.FAILED, ReplicaState.STOPPED):
                self.registry.set_state(replica, ReplicaState.STOPPING)
        await asyncio.gather(*(self.supervisor.stop(model.name, i) for i in list(model.replicas)))
        self.placer.release(model.name)
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

    def _begin(self, model: Model, operation: Operation, work: Awaitable[None]) -> asyncio.Task[None]:
        model.operation = operation
        self.registry.changed(model.name)

        async def runner() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("model %s: %s failed", model.name, operation.value)
                # What it reserved for replicas it never added must not stay reserved until `model stop`.
                if self.registry.models.get(model.name) is model:
                    leaked = self.placer.release_all_but(model.name, model.replicas)
                    if leaked:
                        log.warning("model %s: released the reservations of replicas %s", model.name, leaked)
            finally:
                if model.operation == operation:
                    model.operation = None
                    self.registry.changed(model.name)

        task = asyncio.get_running_loop().create_task(runner(), name=f"{operation.value} {model.name}")
        model.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _wait_replica_settled(self, model: Model, replica: Replica) -> None:
        """Until `replica` is ready or has failed for good (or the model is being stopped)."""
        queue = self.registry.subscribe()
        try:
            while not (model.stopping or replica.state in (ReplicaState.READY, ReplicaState.FAILED)):
                await queue.get()
        finally:
            self.registry.unsubscribe(queue)

    async def _wait_settled(self, model: Model) -> None:
        queue = self.registry.subscribe()
        try:
            while not (model.stopping or model.settled()):
                await queue.get()
        finally:
            self.registry.unsubscribe(queue)

    def save_now(self) -> None:
        """Write the desired state as it is (SPEC §12: which models are idle, so a restart keeps them so); a
        failure is logged, not raised: the models' requests are saved already, and the next save tries again."""
        try:
            self._save({})
        except GpudError as exc:
            log.error("%s", exc.message)

    def _save(self, changes: dict[str, ModelSpec | None], idle: dict[str, bool] | None = None) -> None:
        """Write the desired state as it will be after `changes` (name → new spec, or None: removed; `idle`:
        name → idle or not), before anything changes in memory: a write that fails (full disk) leaves both
        the file and the daemon as they were."""
        specs: dict[str, ModelSpec | None] = {
            m.name: m.spec for m in self.registry if not m.stopping and m.name not in self.declared
        }
        specs.update(self.unrestored)
        specs.update(changes)
        demand = {
            m.name: DemandRecord(m.idle, m.last_request_at)
            for m in self.registry if not m.stopping and changes.get(m.name, m.spec) is not None
        }
        for name, is_idle in (idle or {}).items():
            demand[name] = DemandRecord(is_idle, demand[name].last_request_at if name in demand else None)
        try:
            self.store.save([spec for spec in specs.values() if spec is not None], demand)
        except OSError as exc:
            raise GpudError(f"Cannot save the state under {self.store.path.parent}: {exc.strerror or exc}; "
                            "nothing was changed.") from None
