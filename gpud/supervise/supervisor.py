"""The supervisor: owns one ReplicaRunner per replica, computes launch plans and environments, checks health.

Replicas that share a GPU start one at a time (vLLM profiles free memory while it starts). The per-replica
lifecycle itself is gpud.supervise.runner; the parent shim that owns each replica's process tree is
gpud.supervise.shim, started from a standby when one waits (gpud.supervise.standby).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from gpud.config import SupervisorSettings
from gpud.engines import EngineContext, LaunchPlan, build_launch
from gpud.gpus.ledger import Ledger, OwnedPids
from gpud.registry import Model, Registry, Replica
from gpud.spec import merge_env
from gpud.supervise.runner import ReplicaRunner
from gpud.supervise.standby import ShimStarter

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
INSTANCE_ENV = "GPUD_INSTANCE"  # marks every replica process with the daemon that owns it (orphan search)


def free_port(taken: set[int]) -> int:
    """A free TCP port on 127.0.0.1 that no other replica of this daemon was given."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port: int = s.getsockname()[1]
        if port not in taken:
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1")


@dataclass(frozen=True)
class Health:
    """One health check: `ok` when it answered 200; `answer` says what came back, for a timeout's message."""

    ok: bool
    answer: str


class Supervisor:
    """Owns every ReplicaRunner; reads settings; computes launch plans and environments."""

    def __init__(
        self,
        registry: Registry,
        ledger: Ledger,
        settings: SupervisorSettings,
        *,
        owned: OwnedPids,
        state_dir: Path,
        config_env: Mapping[str, str],
        instance: str,
        python_for: Callable[[Model], tuple[str, str | None]] = lambda m: (sys.executable, None),
        extra_env_for: Callable[[Model], Mapping[str, str]] = lambda m: {},
    ) -> None:
        self.registry = registry
        self.ledger = ledger
        self.settings = settings
        self.owned = owned
        self.state_dir = state_dir
        self.config_env = dict(config_env)
        self.instance = instance
        self.python_for = python_for
        self.extra_env_for = extra_env_for
        self.runners: dict[tuple[str, int], ReplicaRunner] = {}
        self._gpu_locks: dict[int, asyncio.Lock] = {}
        self._session: aiohttp.ClientSession | None = None
        self.shims = ShimStarter(state_dir, {**os.environ, INSTANCE_ENV: instance})

    def taken_ports(self) -> set[int]:
        return {r.port for m in self.registry for r in m.replicas.values() if r.port}

    # ---- launching and stopping ---------------------------------------------------------------------
    def launch(self, model: Model, replica: Replica, on_end: Callable[[Replica], None]) -> ReplicaRunner:
        """Start supervising `replica` (its reservation is already in the ledger). `on_end(replica)` is called
        when it ends by itself (failed for good, or a clean exit that is not restarted), its tree gone."""
        if not replica.port:
            replica.port = free_port(self.taken_ports())
        runner = ReplicaRunner(self, model, replica, on_end)
        self.runners[(model.name, replica.index)] = runner
        runner.start()
        return runner

    async def stop(self, model: str, index: int) -> None:
        """Stop one replica; returns once no process of it is left."""
        runner = self.runners.get((model, index))
        if runner is not None:
            await runner.stop()
            if self.runners.get((model, index)) is runner:  # a new runner may have taken the slot meanwhile
                del self.runners[(model, index)]

    def connect_failed(self, replica: Replica) -> None:
        runner = self.runners.get((replica.model, replica.index))
        if runner is not None:
            runner.connect_failed()

    async def shutdown(self) -> None:
        await asyncio.gather(*(r.stop() for r in list(self.runners.values())), return_exceptions=True)
        self.runners.clear()
        await self.shims.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- what a replica runs ------------------------------------------------------------------------
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

    async def start_slots(self, gpus: tuple[int, ...], stopped: asyncio.Event) -> StartSlots | None:
        """Wait for the start turn on every GPU of a replica: replicas that share a GPU start one at a time.
        None when `stopped` is set first (the replica was told to stop while it waited)."""
        slots = StartSlots([self._gpu_locks.setdefault(g, asyncio.Lock()) for g in sorted(gpus)])
        return slots if await slots.acquire(stopped) else None

    # ---- health and GPU memory ----------------------------------------------------------------------
    async def health(self, port: int, path: str, *, timeout: float) -> Health:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout),
                connector=aiohttp.TCPConnector(limit=0, force_close=True),
            )
        try:
            async with self._session.get(f"http://{HOST}:{port}{path}",
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                return Health(resp.status == 200, f"HTTP {resp.status}")
        except asyncio.TimeoutError:
            return Health(False, f"no answer within {timeout:g} s")
        except (aiohttp.ClientError, OSError) as exc:
            cause = getattr(exc, "strerror", None) or type(exc).__name__
            return Health(False, f"no connection ({cause})")

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
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if time.monotonic() >= deadline:
                log.warning("GPU memory of pids %s not released after %.0f s", holding, timeout)
                return
            await asyncio.sleep(0.2)


class StartSlots:
    """The start locks of several GPUs, taken in index order (no deadlock); released on leaving the block."""

    def __init__(self, locks: list[asyncio.Lock]) -> None:
        self.locks = locks

    async def acquire(self, stopped: asyncio.Event) -> bool:
        """Take every lock, or none and False once `stopped` is set."""
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
                    for held in taken:
                        held.release()
                    return False
        except BaseException:
            for lock in taken:
                lock.release()
            raise
        return True

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        for lock in self.locks:
            lock.release()
