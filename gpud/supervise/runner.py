"""One replica's life with systemd's semantics: its start turn, health, restart with backoff, the start limit,
and a graceful stop of its whole process tree.

A ReplicaRunner is one asyncio task. The process it spawns is the parent shim (`gpud.supervise.shim`), which
owns the engine's process tree (subreaper + parent-death signal), so that no process of a replica outlives
the daemon even when the daemon is SIGKILLed. The runner never touches reservations: when the replica ends
by itself (failed for good, or exited cleanly with nothing to restart) it calls `on_end`, after its tree
is gone; when it is told to stop, whoever stopped it decides.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psutil

from gpud.engines import LaunchPlan
from gpud.exits import describe_exit, signal_name
from gpud.registry import Model, Replica, ReplicaState
from gpud.supervise import procs
from gpud.supervise.logs import log_path
from gpud.supervise.policy import RestartPolicy, StartLimit

if TYPE_CHECKING:
    from gpud.supervise.supervisor import Supervisor

log = logging.getLogger(__name__)

# A replica that ran healthy at least this long (or restart_max_delay_sec, if longer) starts its backoff
# anew when it fails: it was not crash-looping.
_LONG_RUN_SEC = 10.0


class Outcome(enum.Enum):
    """How one life of a replica ended."""

    READY = "ready"  # became ready (a life goes on to be watched)
    EXITED = "exited"  # the engine exited
    EXITED_AFTER_LONG_RUN = "exited after a long run"  # exited after running healthy long enough
    TIMEOUT = "timeout"  # never became ready within the start timeout
    UNHEALTHY = "unhealthy"  # failed its health checks in a row
    STOPPED = "stopped"  # told to stop


@dataclass
class _Run:
    """One spawned shim and what it reported about its engine child."""

    proc: asyncio.subprocess.Process
    pid: int | None = None
    exit: dict[str, object] | None = None
    exec_error: str | None = None
    tree: dict[int, psutil.Process] = field(default_factory=dict)  # the shim's tree as last seen
    exited: asyncio.Event = field(default_factory=asyncio.Event)


class ReplicaRunner:
    """Runs one replica until told to stop or until it fails for good."""

    def __init__(self, sup: Supervisor, model: Model, replica: Replica, on_end: Callable[[Replica], None]) -> None:
        self.sup = sup
        self.model = model
        self.replica = replica
        self.on_end = on_end
        self.run: _Run | None = None
        self.stop_requested = False
        self.suspect = False  # the proxy saw a connection failure: check health now
        self.wake = asyncio.Event()
        self.stopped = asyncio.Event()  # set once by stop(); lets a replica waiting for its start turn leave
        self.task: asyncio.Task[None] | None = None

    # ---- control from outside -------------------------------------------------------------------
    def start(self) -> None:
        name = f"replica {self.replica.model}#{self.replica.index}"
        self.task = asyncio.get_running_loop().create_task(self._main(), name=name)

    async def stop(self) -> None:
        """Leave the balancer, drain, terminate the tree; returns when no process of the replica is left."""
        self.stop_requested = True
        self.stopped.set()
        if self.replica.state in (ReplicaState.READY, ReplicaState.UNHEALTHY, ReplicaState.STARTING,
                                  ReplicaState.PENDING, ReplicaState.BACKOFF):
            self.sup.registry.set_state(self.replica, ReplicaState.STOPPING)
        self.wake.set()
        if self.task is not None:
            await asyncio.shield(self.task)

    def connect_failed(self) -> None:
        if self.replica.state is ReplicaState.READY:
            self.suspect = True
            self.sup.registry.set_state(self.replica, ReplicaState.UNHEALTHY, "connections to it fail")
            self.wake.set()

    # ---- the lifecycle --------------------------------------------------------------------------
    async def _main(self) -> None:
        settings = self.sup.settings
        policy = RestartPolicy(settings.restart, settings.restart_sec, settings.restart_max_delay_sec)
        limit = StartLimit(settings.start_limit_burst, settings.start_limit_interval_sec)
        consecutive = 0
        try:
            while not self.stop_requested:
                outcome, message = await self._one_life()
                if self.stop_requested:
                    break
                if outcome is Outcome.EXITED_AFTER_LONG_RUN:  # the next failure starts the backoff anew
                    consecutive = 0
                exited = outcome in (Outcome.EXITED, Outcome.EXITED_AFTER_LONG_RUN)
                clean = exited and self.replica.last_exit == {"code": 0, "signal": None}
                if not policy.should_restart(clean_exit=clean):
                    final = ReplicaState.STOPPED if clean else ReplicaState.FAILED
                    self._end(final, f"{message}; restart={settings.restart.value} does not restart it")
                    return
                if limit.record_failure(time.monotonic()):
                    self._end(
                        ReplicaState.FAILED,
                        f"{message}; it failed more than {settings.start_limit_burst} times within "
                        f"{settings.start_limit_interval_sec:g} s, so gpud gave up "
                        f"(`gpud model restart {self.replica.model}` tries again)",
                    )
                    return
                consecutive += 1
                delay = policy.delay(consecutive)
                self.sup.registry.set_state(self.replica, ReplicaState.BACKOFF, f"{message}; restarting in {delay:g} s")
                await self._pause(delay)
                if self.stop_requested:
                    break
                self.replica.restarts += 1
            self._settle(ReplicaState.STOPPED, None)
        except asyncio.CancelledError:
            await self._terminate()
            raise
        except Exception as exc:  # a bug must not leave a process behind or kill the daemon
            log.exception("replica %s#%d: supervisor error", self.replica.model, self.replica.index)
            await self._terminate()
            self._end(ReplicaState.FAILED, f"gpud could not supervise it: {exc}")

    def _settle(self, state: ReplicaState, message: str | None) -> None:
        # The tree is gone by now (every _one_life ends with _terminate).
        self.replica.pid = None
        self.sup.registry.set_state(self.replica, state, message)

    def _end(self, state: ReplicaState, message: str) -> None:
        """The replica ended by itself: nobody asked; its owner hears of it (and frees its memory)."""
        self._settle(state, message)
        self.on_end(self.replica)

    async def _pause(self, seconds: float) -> None:
        self.wake.clear()
        if self.stop_requested:
            return
        try:
            await asyncio.wait_for(self.wake.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    async def _one_life(self) -> tuple[Outcome, str]:
        """Start, wait for ready, watch. Returns (outcome, sentence) after the tree is gone."""
        plan = self.sup.launch_plan(self.model, self.replica)
        self.sup.registry.set_state(self.replica, ReplicaState.PENDING)
        slots = await self.sup.start_slots(self.replica.gpus, self.stopped)
        if slots is None:
            return Outcome.STOPPED, "stopped"
        async with slots:
            if self.stop_requested:
                return Outcome.STOPPED, "stopped"
            await self._spawn(plan)
            outcome, message = await self._wait_ready(plan)
        if outcome is Outcome.READY:
            outcome, message = await self._watch(plan)
        if self.stop_requested:
            await self._drain()
        await self._terminate()
        if outcome in (Outcome.EXITED, Outcome.EXITED_AFTER_LONG_RUN):
            last = self.replica.last_exit
            message = describe_exit(last["code"], last["signal"]) if last else "exited"
            if self.run and self.run.exec_error:
                message = self.run.exec_error
        return outcome, message

    async def _spawn(self, plan: LaunchPlan) -> None:
        replica = self.replica
        path = log_path(self.sup.state_dir, replica.model, replica.index)
        path.parent.mkdir(parents=True, exist_ok=True)
        env = self.sup.replica_env(self.model, replica)
        proc = await self.sup.shims.start(
            ["--log", str(path), "--stop-timeout", f"{self.sup.settings.stop_timeout_sec:g}",
             "--parent-pid", str(os.getpid()), "--", *plan.argv], env)
        self.run = _Run(proc)
        self.sup.registry.set_state(replica, ReplicaState.STARTING)
        asyncio.get_running_loop().create_task(self._read_events(self.run))

    def _refresh_tree(self, run: _Run) -> None:
        # Replaced, not merged: the shim is a subreaper, so its current descendants are all there is, and an
        # old pid may since belong to somebody else.
        run.tree = {p.pid: p for p in procs.tree(run.proc.pid)}
        self.sup.owned.set(self.replica.model, self.replica.index, run.tree)

    async def _read_events(self, run: _Run) -> None:
        assert run.proc.stdout is not None
        try:
            async for raw in run.proc.stdout:
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if event.get("event") == "spawned":
                    run.pid = int(event["pid"])
                    self.replica.pid = run.pid
                    self._refresh_tree(run)
                    self.sup.registry.changed(self.replica.model)
                elif event.get("event") == "exited":
                    run.exit = {"code": event.get("code"), "signal": event.get("signal")}
                    run.exec_error = event.get("error")
        finally:
            await run.proc.wait()
            if run.exit is None:  # the shim itself died without a report
                rc = run.proc.returncode
                run.exit = {"code": rc, "signal": None} if rc is not None and rc >= 0 else \
                    {"code": None, "signal": signal_name(-(rc or 0))}
            self.replica.last_exit = run.exit
            run.exited.set()
            self.wake.set()

    async def _wait_ready(self, plan: LaunchPlan) -> tuple[Outcome, str]:
        assert self.run is not None
        timeout = self.sup.start_timeout(self.model, plan)
        deadline = time.monotonic() + timeout
        # A check every 0.05 s: a request waiting for a wake (SPEC §12) waits for the one that sees the engine
        # ready, and a refused connection or a 503 on localhost costs next to nothing.
        interval = 0.05
        answer = "nothing yet"
        while True:
            if self.stop_requested:
                return Outcome.STOPPED, "stopped"
            if self.run.exited.is_set():
                return Outcome.EXITED, "exited during start"
            health = await self.sup.health(self.replica.port, plan.health_path, timeout=2.0)
            if health.ok and not self.stop_requested:
                self.sup.registry.set_state(self.replica, ReplicaState.READY)
                return Outcome.READY, "ready"
            answer = health.answer
            if time.monotonic() >= deadline:
                return Outcome.TIMEOUT, (f"did not become ready within {timeout:g} s "
                                         f"(GET {plan.health_path} on port {self.replica.port}: {answer})")
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass

    async def _watch(self, plan: LaunchPlan) -> tuple[Outcome, str]:
        assert self.run is not None
        settings = self.sup.settings
        failures = 0
        ready_at = time.monotonic()
        while True:
            self.wake.clear()
            if not (self.stop_requested or self.run.exited.is_set() or self.suspect):
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=settings.health_interval_sec)
                except asyncio.TimeoutError:
                    pass
            if self.stop_requested:
                return Outcome.STOPPED, "stopped"
            if self.run.exited.is_set():
                long = time.monotonic() - ready_at >= max(settings.restart_max_delay_sec, _LONG_RUN_SEC)
                return (Outcome.EXITED_AFTER_LONG_RUN if long else Outcome.EXITED), "exited"
            self.suspect = False
            self._refresh_tree(self.run)
            timeout = min(5.0, settings.health_interval_sec)
            if (await self.sup.health(self.replica.port, plan.health_path, timeout=timeout)).ok:
                failures = 0
                if self.replica.state is ReplicaState.UNHEALTHY and not self.stop_requested:
                    self.sup.registry.set_state(self.replica, ReplicaState.READY)
                continue
            failures += 1
            if failures >= settings.health_failures:
                return Outcome.UNHEALTHY, f"failed {failures} health checks in a row"
            if self.replica.state is ReplicaState.READY:
                self.sup.registry.set_state(self.replica, ReplicaState.UNHEALTHY, f"health check failed ({failures})")

    async def _drain(self) -> None:
        """Out of the balancer (STOPPING; once every proxy worker routes by a table that says so, `routed` is
        False), then let in-flight requests finish, up to drain_timeout_sec."""
        if self.replica.state is not ReplicaState.STOPPING:
            self.sup.registry.set_state(self.replica, ReplicaState.STOPPING)
        deadline = time.monotonic() + self.sup.settings.drain_timeout_sec
        while (self.replica.routed or self.replica.inflight > 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polling the proxy's copied counts; the proxy lives in other processes

    async def _terminate(self) -> None:
        """SIGTERM the tree (via the shim), SIGKILL what is left after stop_timeout_sec, wait until nothing is."""
        run = self.run
        if run is None:
            return
        if not run.exited.is_set():
            self._refresh_tree(run)
            _signal(run.proc.pid, signal.SIGTERM)
            try:
                # The shim itself escalates to SIGKILL after stop_timeout; give it that long plus a margin.
                await asyncio.wait_for(run.exited.wait(), timeout=self.sup.settings.stop_timeout_sec + 5)
            except asyncio.TimeoutError:
                self._refresh_tree(run)
                procs.signal_processes(run.tree.values(), signal.SIGKILL)
                await run.exited.wait()
        # The shim reaps its tree before it exits; check anyway, the promise is "nothing left".
        procs.signal_processes(run.tree.values(), signal.SIGKILL)
        await self.sup.wait_gpu_free(set(run.tree), self.replica.gpus)
        run.tree = {}
        self.sup.owned.discard(self.replica.model, self.replica.index)  # no longer ours: "used by others" now
        self.replica.pid = None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
