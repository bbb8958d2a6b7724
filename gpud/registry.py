"""The daemon's one source of truth: models → replicas → state. The API, proxy, metrics and sd_notify read it.

Only the supervisor and the daemon write it; every change is published as an event (for `GET /v1/events`
and the CLI's progress display) through `Registry.publish`.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from gpud.spec import ModelSpec, mask_env


class ReplicaState(str, enum.Enum):
    PENDING = "pending"      # placed, waiting for its turn to start (GPU shared with a starting replica)
    STARTING = "starting"    # process spawned, health not yet 200
    READY = "ready"          # in the balancer
    UNHEALTHY = "unhealthy"  # failing health checks or connections; out of the balancer
    STOPPING = "stopping"    # draining / terminating
    STOPPED = "stopped"
    BACKOFF = "backoff"      # failed; waiting for the restart delay
    FAILED = "failed"        # gave up (start limit, or restart policy says no); reservation released


class ModelState(str, enum.Enum):
    """A model's state as `model show` says it (SPEC §5), derived from its replicas."""

    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"
    FAILED = "failed"
    STOPPING = "stopping"
    IDLE = "idle"  # SPEC §12: no replica loaded; the next request (or `model load`) wakes it


class Operation(str, enum.Enum):
    """What the service is doing to a model while the model is busy."""

    START = "start"
    SCALE = "scale"
    RESTART = "restart"
    STOP = "stop"
    LOAD = "load"  # a wake: from a request or `model load`
    UNLOAD = "unload"  # going idle: timeout, `model unload`, or evicted


@dataclass
class Replica:
    model: str
    index: int
    gpus: tuple[int, ...]
    vram_by_gpu: tuple[int, ...]
    port: int = 0
    state: ReplicaState = ReplicaState.PENDING
    pid: int | None = None          # the engine process (holds the merged env)
    restarts: int = 0
    inflight: int = 0               # requests in flight through the proxy (copied from its shared counters)
    # True while some proxy worker may still send it new requests: every worker has not yet applied a route
    # table in which it is out of the balancer. The drain of SPEC §7 waits for this to be False.
    routed: bool = False
    last_exit: dict[str, Any] | None = None
    message: str | None = None      # why it is failed/unhealthy, for people
    since: float = field(default_factory=time.time)

    @property
    def vram_bytes(self) -> int:
        return min(self.vram_by_gpu) if self.vram_by_gpu else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "state": self.state.value,
            "pid": self.pid,
            "gpus": list(self.gpus),
            "vram_bytes": self.vram_bytes,
            "port": self.port,
            "restarts": self.restarts,
            "inflight": self.inflight,
            "last_exit": self.last_exit,
            "message": self.message,
        }


@dataclass
class Model:
    spec: ModelSpec
    replicas: dict[int, Replica] = field(default_factory=dict)
    stopping: bool = False
    venv: dict[str, Any] | None = None      # {"path", "packages"} once the venv is resolved
    created_at: float = field(default_factory=time.time)
    operation: Operation | None = None      # while one is in progress
    task: asyncio.Task[None] | None = field(default=None, repr=False)  # the operation's task
    # SPEC §12. `idle`: nothing loaded, wakes on demand. `desired`: replicas it runs now (spec.replicas, the
    # floor, plus what load-based scaling added). `last_request_at`: when a POST to the model last began or
    # ended (epoch s; the proxy workers count it, the daemon copies it here). `loaded_at`: when a replica was
    # first ready since the model was last loaded (the idle clock's start; set by set_state).
    idle: bool = False
    desired: int = 0
    last_request_at: float | None = None
    loaded_at: float | None = None
    evict_after: float = 0.0                # not evicted before (requests that waited for its wake are on their way)
    message: str | None = None              # why the last load failed, for people

    def __post_init__(self) -> None:
        if not self.desired:
            self.desired = self.spec.replicas

    @property
    def name(self) -> str:
        return self.spec.name

    def inflight(self) -> int:
        return sum(r.inflight for r in self.replicas.values())

    def ready_replicas(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.state is ReplicaState.READY]

    def state(self) -> ModelState:
        if self.stopping or self.operation is Operation.UNLOAD:
            return ModelState.STOPPING
        if self.idle and not self.replicas:
            return ModelState.IDLE
        states = [r.state for r in self.replicas.values()]
        ready = states.count(ReplicaState.READY)
        if states and ready == len(states) == self.desired:
            return ModelState.RUNNING
        if ready == 0 and ReplicaState.FAILED in states:  # SPEC §7: failed when none is ready
            return ModelState.FAILED
        troubled = {ReplicaState.FAILED, ReplicaState.BACKOFF, ReplicaState.UNHEALTHY, ReplicaState.STOPPED}
        if any(s in troubled for s in states) or any(r.restarts for r in self.replicas.values()):
            return ModelState.DEGRADED
        return ModelState.STARTING

    def served_state(self) -> str:
        """The state as the proxy's per-model health and the gateway read it: an unload (idle timeout,
        `model unload`, an eviction) leads to `idle`, which is still served (the next request wakes it,
        SPEC §12), not to `stopping`, which is the end of the model on this node."""
        if self.operation is Operation.UNLOAD and not self.stopping:
            return ModelState.IDLE.value
        return self.state().value

    def settled(self) -> bool:
        """True when waiting for this model is over: every replica ready, or one has failed for good."""
        final = (ReplicaState.FAILED, ReplicaState.STOPPED)
        states = [r.state for r in self.replicas.values()]
        return all(s is ReplicaState.READY for s in states) or any(s in final for s in states)

    def to_json(self, endpoint: str) -> dict[str, Any]:
        spec = self.spec
        return {
            "name": spec.name,
            "model": spec.model,
            "engine": spec.engine,
            "state": self.state().value,
            "busy": self.operation is not None,
            "replicas_desired": self.desired,
            "replicas_ready": len(self.ready_replicas()),
            "endpoint": endpoint,
            "env": mask_env(spec.env),
            "unset_env": list(spec.unset_env),
            "venv": self.venv,
            "placement": spec.placement,
            "routing": spec.routing,
            "gpus_per_replica": spec.gpus_per_replica,
            "vram_bytes": spec.vram_bytes,
            "estimate": None if spec.estimate is None else spec.estimate.to_json(),
            "args": list(spec.args),
            "created_at": self.created_at,
            "last_request_at": _iso(self.last_request_at),
            "idle_timeout_sec": spec.idle_timeout_sec,
            "on_demand": spec.on_demand,
            "min_replicas": spec.replicas,
            "max_replicas": spec.max_replicas,
            "target_inflight": spec.target_inflight,
            "message": self.message,
            "replicas": [r.to_json() for r in sorted(self.replicas.values(), key=lambda r: r.index)],
        }


def _iso(when: float | None) -> str | None:
    """ISO 8601 in UTC with milliseconds (`2025-01-31T12:00:00.123+00:00`), or None."""
    if when is None:
        return None
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(timespec="milliseconds")


# The last event a subscriber gets: the daemon is going away. An event stream sends it and ends, so that
# no client holds up the shutdown (SPEC §3: SIGTERM ends the daemon in the time the stop sequence takes).
SHUTDOWN_EVENT: dict[str, Any] = {"type": "shutdown"}


class Registry:
    """Models by name, plus a fan-out of state-change events to subscribers."""

    def __init__(self) -> None:
        self.models: dict[str, Model] = {}
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._listeners: list[Callable[[], None]] = []
        self.closed = False

    def get(self, name: str) -> Model | None:
        return self.models.get(name)

    def __iter__(self) -> Iterator[Model]:
        return iter(list(self.models.values()))

    def counts(self) -> dict[str, int]:
        replicas = [r for m in self.models.values() for r in m.replicas.values()]
        return {
            "models": len(self.models),
            "replicas": len(replicas),
            "ready": sum(r.state is ReplicaState.READY for r in replicas),
        }

    def set_state(self, replica: Replica, state: ReplicaState, message: str | None = None) -> None:
        replica.state = state
        replica.since = time.time()
        # A failure's sentence stays visible through the restart that follows it; being ready clears it.
        if message is not None or state is ReplicaState.READY:
            replica.message = message
        model = self.models.get(replica.model)
        if state is ReplicaState.READY and model is not None and model.loaded_at is None:
            # SPEC §12: the idle clock starts when the model serves, however it got there (a start, a wake, a
            # restart of a failed model, a replica coming back while another still starts).
            model.loaded_at = replica.since
        self.changed(replica.model)

    def changed(self, name: str) -> None:
        """Tell subscribers that model `name` changed (the API renders its current state for them)."""
        self.publish({"type": "changed", "name": name})

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (synchronously, so keep it cheap: schedule work) after every published event."""
        self._listeners.append(listener)

    def publish(self, event: dict[str, Any]) -> None:
        event.setdefault("time", time.time())
        for listener in self._listeners:
            listener()
        for queue in list(self._subscribers):
            if queue.qsize() < 10_000:  # a stuck reader must not grow the daemon without bound
                queue.put_nowait(event)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers.add(queue)
        if self.closed:
            queue.put_nowait(SHUTDOWN_EVENT)
        return queue

    def close(self) -> None:
        """The daemon is shutting down: every subscriber gets SHUTDOWN_EVENT (event streams end with it)."""
        self.closed = True
        for queue in list(self._subscribers):
            queue.put_nowait(SHUTDOWN_EVENT)

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(queue)
