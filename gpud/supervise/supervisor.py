"""Replica lifecycle with systemd's semantics: start one at a time per GPU, health, restart with backoff,
start limit, graceful stop of the whole process tree, and a reservation released only when nothing is left.

Each replica has a ReplicaRunner (one asyncio task). The process it spawns is `gpud.supervise.shim`, a small parent
shim that owns the engine's process tree (subreaper + parent-death signal), so that no process of a
replica outlives the daemon even when the daemon is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from gpud.config import SupervisorSettings
from gpud.engines import EngineContext, LaunchPlan, build_launch
from gpud.gpus.ledger import Ledger
from gpud.registry import Model, Registry, Replica, ReplicaState
from gpud.spec import merge_env
from gpud.supervise import procs
from gpud.supervise.logs import log_path
from gpud.supervise.policy import RestartPolicy, StartLimit

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
INSTANCE_ENV = "GPUD_INSTANCE"  # marks every replica process with the daemon that owns it (orphan search)


def free_port(taken: set[int]) -> int:
    """A free TCP port on 127.0.0.1 that no other replica of this daemon was given."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1")


@dataclass
class _Run:
    """One spawned shim and what it reported about its engine child."""

    proc: asyncio.subprocess.Process
    pid: int | None = None
    exit: dict[str, object] | None = None
    exec_error: str | None = None
    tree: dict[int, psutil.Process] = field(default_factory=dict)  # the shim's tree as last seen
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    def refresh_tree(self) -> None:
        # Replaced, not merged: the shim is a subreaper, so its current descendants are all there is, and an
        # old pid may since belong to somebody else.
        self.tree = {p.pid: p for p in procs.tree(self.proc.pid)}


class ReplicaRunner:
    """Runs one replica until told to stop or until it fails for good."""

    def __init__(self, sup: Supervisor, model: Model, replica: Replica) -> None:
        self.sup = sup
        self.model = model
        self.replica = replica
        self.run: _Run | None = None
        self.stop_requested = False
        self.suspect = False  # the proxy saw a connection failure: check health now
        self.wake = asyncio.Event()
        self.stopped = asyncio.Event()  # set once by stop(); lets a replica waiting for its start turn leave
        self.keep_reservation = False
        self.task: asyncio.Task[None] | None = None

    # ---- control from outside -------------------------------------------------------------------
    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._main(), name=f"replica {self.replica.model}#{self.replica.index}")

    async def stop(self, release: bool = True) -> None:
        """Leave the balancer, drain, terminate the tree, release the reservation (unless `release` is False:
        a restart keeps it); returns when all is done."""
        self.stop_requested = True
        self.keep_reservation = not release
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
                if outcome == "ready-long":  # ran healthy long enough: the next failure starts the backoff anew
                    consecutive = 0
                    outcome = "exit"
                clean = outcome == "exit" and self.replica.last_exit == {"code": 0, "signal": None}
                if not policy.should_restart(clean_exit=clean):
                    final = ReplicaState.STOPPED if clean else ReplicaState.FAILED
                    self._finish(final, f"{message}; restart={settings.restart} does not restart it")
                    return
                if limit.record_failure(time.monotonic()):
                    self._finish(
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
            self._finish(ReplicaState.STOPPED, None)
        except asyncio.CancelledError:
            await self._terminate()
            raise
        except Exception as exc:  # a bug must not leave a process behind or kill the daemon
            log.exception("replica %s#%d: supervisor error", self.replica.model, self.replica.index)
            await self._terminate()
            self._finish(ReplicaState.FAILED, f"gpud could not supervise it: {exc}")

    def _finish(self, state: ReplicaState, message: str | None) -> None:
        # The tree is gone by now (every _one_life ends with _terminate), so the memory is really free.
        if not (self.keep_reservation and state is ReplicaState.STOPPED):
            self.sup.ledger.release(self.replica.model, self.replica.index)
        self.replica.pid = None
        self.sup.registry.set_state(self.replica, state, message)

    async def _pause(self, seconds: float) -> None:
        self.wake.clear()
        if self.stop_requested:
            return
        try:
            await asyncio.wait_for(self.wake.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    async def _one_life(self) -> tuple[str, str]:
        """Start, wait for ready, watch. Returns (outcome, sentence) after the tree is gone."""
        plan = self.sup.launch_plan(self.model, self.replica)
        self.sup.registry.set_state(self.replica, ReplicaState.PENDING)
        try:
            slots = await self.sup.start_slots(self.replica.gpus, self.stopped)
        except _StopWhileWaiting:
            return "stop", "stopped"
        async with slots:
            if self.stop_requested:
                return "stop", "stopped"
            await self._spawn(plan)
            outcome, message = await self._wait_ready(plan)
        if outcome == "ready":
            outcome, message = await self._watch(plan)
        if self.stop_requested:
            await self._drain()
        await self._terminate()
        if outcome in ("exit", "ready-long"):
            last = self.replica.last_exit
            message = procs.describe_exit(last["code"], last["signal"]) if last else "exited"
            if self.run and self.run.exec_error:
                message = self.run.exec_error
        return outcome, message

    async def _spawn(self, plan: LaunchPlan) -> None:
        replica = self.replica
        path = log_path(self.sup.state_dir, replica.model, replica.index)
        path.parent.mkdir(parents=True, exist_ok=True)
        env = self.sup.replica_env(self.model, replica)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gpud.supervise.shim", "--log", str(path),
            "--stop-timeout", f"{self.sup.settings.stop_timeout_sec:g}", "--parent-pid", str(os.getpid()),
            "--", *plan.argv,
            env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            start_new_session=True, cwd=str(self.sup.state_dir),
        )
        self.run = _Run(proc)
        self.sup.registry.set_state(replica, ReplicaState.STARTING)
        asyncio.get_running_loop().create_task(self._read_events(self.run))

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
                    run.refresh_tree()
                    self.sup.registry.changed(self.replica.model)
                elif event.get("event") == "exited":
                    run.exit = {"code": event.get("code"), "signal": event.get("signal")}
                    run.exec_error = event.get("error")
        finally:
            await run.proc.wait()
            if run.exit is None:  # the shim itself died without a report
                rc = run.proc.returncode
                run.exit = {"code": rc, "signal": None} if rc is not None and rc >= 0 else \
                    {"code": None, "signal": procs.signal_name(-(rc or 0))}
            self.replica.last_exit = run.exit
            run.exited.set()
            self.wake.set()

    async def _wait_ready(self, plan: LaunchPlan) -> tuple[str, str]:
        assert self.run is not None
        timeout = self.sup.start_timeout(self.model, plan)
        deadline = time.monotonic() + timeout
        interval = 0.05
        while True:
            if self.stop_requested:
                return "stop", "stopped"
            if self.run.exited.is_set():
                return "exit", "exited during start"
            if await self.sup.healthy(self.replica.port, plan.health_path, timeout=2.0) and not self.stop_requested:
                self.sup.registry.set_state(self.replica, ReplicaState.READY)
                return "ready", "ready"
            if time.monotonic() >= deadline:
                return "timeout", f"did not become ready within {timeout:g} s"
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass
            interval = min(interval * 1.5, 1.0)

    async def _watch(self, plan: LaunchPlan) -> tuple[str, str]:
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
                return "stop", "stopped"
            if self.run.exited.is_set():
                long = time.monotonic() - ready_at >= max(settings.restart_max_delay_sec, 10.0)
                return ("ready-long" if long else "exit"), "exited"
            self.suspect = False
            self.run.refresh_tree()
            if await self.sup.healthy(self.replica.port, plan.health_path, timeout=min(5.0, settings.health_interval_sec)):
                failures = 0
                if self.replica.state is ReplicaState.UNHEALTHY and not self.stop_requested:
                    self.sup.registry.set_state(self.replica, ReplicaState.READY)
                continue
            failures += 1
            if failures >= settings.health_failures:
                return "unhealthy", f"failed {failures} health checks in a row"
            if self.replica.state is ReplicaState.READY:
                self.sup.registry.set_state(self.replica, ReplicaState.UNHEALTHY, f"health check failed ({failures})")

    async def _drain(self) -> None:
        """Out of the balancer already (STOPPING); let in-flight requests finish, up to drain_timeout_sec."""
        if self.replica.state is not ReplicaState.STOPPING:
            self.sup.registry.set_state(self.replica, ReplicaState.STOPPING)
        deadline = time.monotonic() + self.sup.settings.drain_timeout_sec
        while self.replica.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polling the proxy's counter; the proxy has no per-request hook here

    async def _terminate(self) -> None:
        """SIGTERM the tree (via the shim), SIGKILL what is left after stop_timeout_sec, wait until nothing is."""
        run = self.run
        if run is None:
            return
        if not run.exited.is_set():
            run.refresh_tree()
            _signal(run.proc.pid, signal.SIGTERM)
            try:
                # The shim itself escalates to SIGKILL after stop_timeout; give it that long plus a margin.
                await asyncio.wait_for(run.exited.wait(), timeout=self.sup.settings.stop_timeout_sec + 5)
            except asyncio.TimeoutError:
                run.refresh_tree()
                procs.signal_processes(run.tree.values(), signal.SIGKILL)
                await run.exited.wait()
        # The shim reaps its tree before it exits; check anyway, the promise is "nothing left".
        procs.signal_processes(run.tree.values(), signal.SIGKILL)
        await self.sup.wait_gpu_free(set(run.tree), self.replica.gpus)
        run.tree = {}  # no longer ours: the ledger must not subtract them from "used by others"
        self.replica.pid = None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Supervisor:
    """Owns every ReplicaRunner; reads settings; computes launch plans and environments."""

    def __init__(
        self,
        registry: Registry,
        ledger: Ledger,
        settings: SupervisorSettings,
        *,
        state_dir: Path,
        config_env: Mapping[str, str],
        instance: str,
        python_for: Callable[[Model], tuple[str, str | None]] = lambda m: (sys.executable, None),
        extra_env_for: Callable[[Model], Mapping[str, str]] = lambda m: {},
    ) -> None:
        self.registry = registry
        self.ledger = ledger
        self.settings = settings
        self.state_dir = state_dir
        self.config_env = dict(config_env)
        self.instance = instance
        self.python_for = python_for
        self.extra_env_for = extra_env_for
        self.runners: dict[tuple[str, int], ReplicaRunner] = {}
        self._gpu_locks: dict[int, asyncio.Lock] = {}
        self._session: aiohttp.ClientSession | None = None

    # ---- queries used by the ledger, proxy and daemon ----------------------------------------------
    def owned_pids(self) -> set[int]:
        pids: set[int] = set()
        for runner in self.runners.values():
            if runner.run is not None:
                pids.update(runner.run.tree)
        return pids

    def taken_ports(self) -> set[int]:
        return {r.port for m in self.registry for r in m.replicas.values() if r.port}

    # ---- launching ----------------------------------------------------------------------------------
    def launch(self, model: Model, replica: Replica) -> ReplicaRunner:
        """Start supervising `replica` (its reservation is already in the ledger)."""
        if not replica.port:
            replica.port = free_port(self.taken_ports())
        runner = ReplicaRunner(self, model, replica)
        self.runners[(model.name, replica.index)] = runner
        runner.start()
        return runner

    async def stop(self, model: str, index: int, *, release: bool = True) -> None:
        runner = self.runners.get((model, index))
        if runner is not None:
            await runner.stop(release)
            if self.runners.get((model, index)) is runner:  # a new runner may have taken the slot meanwhile
                del self.runners[(model, index)]
        elif release:
            self.ledger.release(model, index)

    def connect_failed(self, replica: Replica) -> None:
        runner = self.runners.get((replica.model, replica.index))
        if runner is not None:
            runner.connect_failed()

    async def shutdown(self) -> None:
        await asyncio.gather(*(r.stop() for r in list(self.runners.values())), return_exceptions=True)
        self.runners.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def launch_plan(self, model: Model, replica: Replica) -> LaunchPlan:
        python, bin_dir = self.python_for(model)
        totals = {d.index: d.total_bytes for d in self.ledger.devices()}
        spec = model.spec
        ctx = EngineContext(
            model=spec.model, name=spec.name, args=spec.args, command=spec.command, port=replica.port,
            host=HOST, vram_bytes=replica.vram_bytes,
            total_bytes=min(totals.get(g, replica.vram_bytes) for g in replica.gpus) if replica.gpus else 0,
            python=python, bin_dir=bin_dir, health_path=spec.health_path,
        )
        return build_launch(spec.engine, ctx)

    def start_timeout(self, model: Model, plan: LaunchPlan) -> float:
        return model.spec.start_timeout_sec or self.settings.start_timeout_sec or plan.start_timeout_sec

    def replica_env(self, model: Model, replica: Replica) -> dict[str, str]:
        managed = {
            "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in replica.gpus),
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "GPUD_MODEL": model.name,
            "GPUD_REPLICA": str(replica.index),
            "GPUD_PORT": str(replica.port),
            INSTANCE_ENV: self.instance,
            **self.extra_env_for(model),
        }
        return merge_env(os.environ, self.config_env, model.spec.env, model.spec.unset_env, managed)

    async def start_slots(self, gpus: tuple[int, ...], stopped: asyncio.Event) -> _StartSlots:
        """Wait for the start turn on every GPU of a replica: replicas that share a GPU start one at a time
        (vLLM profiles free memory while it starts). Raises _StopWhileWaiting when `stopped` is set first."""
        slots = _StartSlots([self._gpu_locks.setdefault(g, asyncio.Lock()) for g in sorted(gpus)])
        await slots.acquire(stopped)
        return slots

    # ---- health and GPU memory ----------------------------------------------------------------------
    async def healthy(self, port: int, path: str, *, timeout: float) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout),
                connector=aiohttp.TCPConnector(limit=0, force_close=True),
            )
        try:
            async with self._session.get(f"http://{HOST}:{port}{path}",
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def wait_gpu_free(self, pids: set[int], gpus: tuple[int, ...], timeout: float = 30.0) -> None:
        """On NVML, wait until no process of the replica's tree holds memory on its GPUs (vLLM's workers can
        outlive the API server for a moment); the sim backend reports no processes, so this returns at once."""
        if not pids:
            return
        deadline = time.monotonic() + timeout
        while True:
            self.ledger.refresh()
            holding = [
                p.pid for d in self.ledger.devices() if d.index in gpus for p in d.processes if p.pid in pids
            ]
            if not holding:
                return
            for pid in holding:
                _signal(pid, signal.SIGKILL)
            if time.monotonic() >= deadline:
                log.warning("GPU memory of pids %s not released after %.0f s", holding, timeout)
                return
            await asyncio.sleep(0.2)


class _StopWhileWaiting(Exception):
    """The replica was told to stop while it waited for its start turn."""


class _StartSlots:
    """The start locks of several GPUs, taken in index order (no deadlock); released on leaving the block."""

    def __init__(self, locks: list[asyncio.Lock]) -> None:
        self.locks = locks

    async def acquire(self, stopped: asyncio.Event) -> None:
        taken: list[asyncio.Lock] = []
        try:
            for lock in self.locks:
                acquiring = asyncio.ensure_future(lock.acquire())
                giving_up = asyncio.ensure_future(stopped.wait())
                await asyncio.wait({acquiring, giving_up}, return_when=asyncio.FIRST_COMPLETED)
                giving_up.cancel()
                if not acquiring.done():
                    acquiring.cancel()
                    await asyncio.gather(acquiring, return_exceptions=True)
                if acquiring.done() and not acquiring.cancelled():
                    taken.append(lock)
                if stopped.is_set():
                    raise _StopWhileWaiting
        except BaseException:
            for lock in taken:
                lock.release()
            raise

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        for lock in self.locks:
            lock.release()
