"""`gpud daemon`: the composition root. Builds settings, ledger, supervisor, service, API and proxy; restores
models; speaks sd_notify; stops everything in order on SIGTERM/SIGINT.

Shutdown order: STOPPING=1 → this node's workers leave the cluster gateway (when `[cluster]` is set) → the
proxy stops accepting → every replica stops (drain, SIGTERM the tree, SIGKILL after stop_timeout_sec) → the
control socket closes → exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from gpud.config import Settings, load_settings
from gpud.control.service import ModelService
from gpud.control.state import StateStore
from gpud.errors import GpudError
from gpud.estimate.measured import OveruseWatch
from gpud.gpus import open_backend
from gpud.gpus.base import GpuBackend
from gpud.gpus.ledger import Ledger, OwnedPids
from gpud.proxy.workers import WORKER_ENV, ProxyWorkers
from gpud.registry import Registry
from gpud.sdnotify import Notifier
from gpud.spec import ModelSpec
from gpud.supervise import procs
from gpud.supervise.supervisor import INSTANCE_ENV, Supervisor
from gpud.venv.store import VenvStore

log = logging.getLogger("gpud")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpud daemon", description="Run the gpud daemon.")
    parser.add_argument("--config", help="TOML config file (default /etc/gpud/gpud.toml or XDG config)")
    parser.add_argument("--socket", help="control socket path")
    parser.add_argument("--state-dir", help="where state, logs and venvs live")
    parser.add_argument("--gpus", help="auto, or sim:2x80GiB for simulated GPUs")
    parser.add_argument("--listen", help="proxy address HOST:PORT (default 127.0.0.1:8000)")
    parser.add_argument("--log-level", default=os.environ.get("GPUD_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def instance_id(state_dir: Path) -> str:
    """Names this daemon's replicas (GPUD_INSTANCE) so a later life on the same state dir can find them."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]


def run_daemon(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = {"config": args.config, "socket": args.socket, "state_dir": args.state_dir,
             "gpus": args.gpus, "listen": args.listen}
    try:
        settings = load_settings(flags)
        backend = open_backend(settings.gpus)
    except GpudError as exc:
        print(f"gpud: {exc.message}", file=sys.stderr)
        return exc.exit_code
    try:
        return _run_loop(Daemon(settings, backend).serve())
    except GpudError as exc:
        print(f"gpud: {exc.message}", file=sys.stderr)
        return exc.exit_code
    finally:
        backend.close()


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run the daemon's coroutine on uvloop (a dependency on Linux), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(main)
    return uvloop.run(main)


class Daemon:
    def __init__(self, settings: Settings, backend: GpuBackend) -> None:
        self.settings = settings
        self.backend = backend
        self.started = time.time()
        self.notifier = Notifier()
        self._stop = asyncio.Event()
        self.ready = False  # the proxy listens and the saved models are restored (READY=1 to systemd)

    async def serve(self) -> int:
        from gpud.control.api import ControlAPI, serve_unix
        from gpud.demand.loop import DemandLoop

        settings = self.settings
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_state_dir()  # before anything that touches replicas: another daemon may own them
        instance = instance_id(settings.state_dir)
        await self._kill_previous_life(instance)

        registry = Registry()
        owned = OwnedPids()  # the supervisor fills it, the ledger reads it
        ledger = Ledger(self.backend, headroom_bytes=settings.headroom_bytes, owned=owned)
        venvs = VenvStore(settings.state_dir / "venvs", environ=os.environ, config_env=settings.env)
        supervisor = Supervisor(registry, ledger, settings.supervisor, owned=owned, state_dir=settings.state_dir,
                                config_env=settings.env, instance=instance,
                                python_for=venvs.python_for, extra_env_for=venvs.extra_env_for)
        registrar = None
        if settings.cluster.enabled:
            from gpud.cluster.registrar import Registrar

            registrar = Registrar.for_daemon(settings, registry)
        service = ModelService(settings, registry, ledger, supervisor, StateStore(settings.state_dir),
                               prepare=venvs.preparer(registry),
                               before_stop=registrar.deregister if registrar is not None else None)
        api = ControlAPI(service, registry, started=self.started, socket_group=settings.socket_group, venvs=venvs,
                         extra_status=lambda: {"ready": self.ready,
                                               "cluster": registrar.status() if registrar is not None else None})
        proxy = ProxyWorkers(registry, settings.proxy, run_dir=settings.state_dir / "run", instance=instance,
                             ledger_rows=lambda: ledger.to_json()["gpus"],
                             on_connect_failure=supervisor.connect_failed, on_wake=service.wake)
        demand = DemandLoop(registry, service, settings.scale)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)

        api_runner = await serve_unix(api.make_app(), settings.socket, settings.socket_group)
        try:
            await proxy.start()
            log.info("gpud %s: control socket %s, proxy http://%s, GPUs %s", _version(), settings.socket,
                     settings.proxy.listen, settings.gpus)
            await self._restore(service)
            if registry.counts()["models"]:
                supervisor.shims.warm()  # the next start (a wake, most often) need not wait for an interpreter
            self.ready = True
            self.notifier.notify("READY=1", f"STATUS={_status_line(registry)}", f"MAINPID={os.getpid()}")
            background = [loop.create_task(self._housekeeping(registry, ledger)), loop.create_task(demand.run())]
            if registrar is not None:
                background.append(loop.create_task(registrar.run(), name="cluster registrar"))
            await self._stop.wait()
            log.info("stopping: %d replicas", registry.counts()["replicas"])
            self.notifier.notify("STOPPING=1")
            api.close_streams()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if registrar is not None:
                await registrar.close()  # while the proxy still serves: the gateway stops sending first
            await proxy.drain()  # no new connections; those open go on while the replicas drain them
            await service.shutdown()
        finally:
            await proxy.close()
            await api_runner.cleanup()
            try:
                os.unlink(settings.socket)
            except OSError:
                pass
            self.notifier.close()
        return 0

    async def _restore(self, service: ModelService) -> None:
        specs, problems = service.store.load()
        for problem in problems:
            log.error("%s", problem)
        declared: list[ModelSpec] = []
        for name, table in self.settings.models.items():
            try:
                declared.append(ModelSpec.from_json({"name": name, **table}))
            except GpudError as exc:
                log.error("[models.%s] in %s: %s", name, self.settings.config_path, exc.message)
        declared_names = {s.name for s in declared}
        demand = service.store.load_demand()  # SPEC §12: idle models stay idle; nothing wakes by itself
        for spec in declared + [s for s in specs if s.name not in declared_names]:
            is_declared = spec.name in declared_names
            record = demand.get(spec.name)
            # An on-demand model comes back idle (nothing is loaded until asked); others as they were saved.
            idle = spec.on_demand or (record is not None and record.idle)
            try:
                await service.start_model(spec, declared=is_declared, restoring=not is_declared, idle=idle,
                                          last_request_at=record.last_request_at if record else None)
            except GpudError as exc:
                log.error("cannot start model %s: %s (it stays saved; `gpud model stop %s` forgets it)",
                          spec.name, exc.message, spec.name)
                if not is_declared:
                    service.unrestored[spec.name] = spec
        # Persisted specs the config now declares are no longer saved state: write that down once.
        if declared_names & {s.name for s in specs}:
            service.save_now()

    async def _housekeeping(self, registry: Registry, ledger: Ledger) -> None:
        """Watchdog pings from the event loop itself (a stuck loop stops them), STATUS=, ledger refresh (and
        the warning for a replica that uses more GPU memory than it reserved)."""
        interval = min(self.notifier.watchdog_sec / 2, 2.0) if self.notifier.watchdog_sec else 2.0
        last_status = ""
        overuse = OveruseWatch()
        while True:
            ledger.refresh()
            overuse.check(ledger)
            status = _status_line(registry)
            lines = ["WATCHDOG=1"] if self.notifier.watchdog_sec else []
            if status != last_status:
                lines.append(f"STATUS={status}")
                last_status = status
            if lines:
                self.notifier.notify(*lines)
            await asyncio.sleep(interval)

    def _lock_state_dir(self) -> None:
        """One daemon per state dir: a second one must not stop the first one's replicas as "orphans"."""
        path = self.settings.state_dir / "daemon.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise GpudError(f"Another gpud daemon is already using the state dir {self.settings.state_dir}.") from None
        self._lock_fd = fd  # held (and released by the kernel) for the life of this process

    async def _kill_previous_life(self, instance: str) -> None:
        """Replicas of an earlier daemon on this state dir that survived it (they should not): stop them
        before their GPU memory is counted as free."""
        orphans = procs.find_orphans(INSTANCE_ENV, instance) + procs.find_orphans(WORKER_ENV, instance)
        if not orphans:
            return
        log.warning("stopping %d process(es) left by a previous gpud on this state dir: %s", len(orphans), orphans)
        for pid in orphans:
            procs.kill_tree(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while procs.alive(orphans) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


def _status_line(registry: Registry) -> str:
    c = registry.counts()
    return f"{c['models']} models, {c['ready']}/{c['replicas']} replicas ready"


def _version() -> str:
    from gpud import __version__

    return __version__
