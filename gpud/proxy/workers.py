"""The daemon's side of the proxy workers (SPEC §14): start them, push the route table, restart the dead,
and copy what they count back into the registry.

The proxy always runs in worker processes (one by default), so the control API and the supervisor never
wait for proxy traffic: the daemon's loop only sends a table when the registry changes and reads a few
counters. Each worker binds the listen address itself with SO_REUSEPORT; the daemon binds it first without
listening, which both reports a busy address with one clear sentence before anything starts and keeps the
port this daemon's while a worker restarts.

What workers count in shared memory (gpud.proxy.counters) the daemon copies into the registry every
SYNC_SEC: each replica's in-flight requests (the drain of SPEC §7, `model show`, load-based scaling read
them there) and each model's last request time (the idle clock of SPEC §12).

No worker outlives the daemon: each asks for a parent-death signal, watches its parent pid, and exits when
the link to the daemon closes; a new daemon also stops workers a previous life left (by their marker).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gpud.config import ProxySettings
from gpud.errors import GpudError
from gpud.proxy.counters import Counters
from gpud.proxy.guard import bound_socket
from gpud.proxy.metrics import MULTIPROC_ENV
from gpud.proxy.server import bind_error
from gpud.proxy.table import Feed, RouteTable
from gpud.registry import Registry, Replica

log = logging.getLogger(__name__)

WORKER_ENV = "GPUD_PROXY_WORKER"  # marks a worker with the daemon that owns it (a later life finds leftovers)
SYNC_SEC = 0.05
READY_TIMEOUT_SEC = 20.0
STOP_TIMEOUT_SEC = 5.0
_UNACKED_TABLES = 1000
_RESTART_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ready = asyncio.Event()
        self.restarts = 0
        self.applied = 0  # the version of the last table it acknowledged


class ProxyWorkers:
    def __init__(
        self,
        registry: Registry,
        settings: ProxySettings,
        *,
        run_dir: Path,
        instance: str,
        ledger_rows: Callable[[], list[Mapping[str, Any]]] = list,
        on_connect_failure: Callable[[Replica], None] = lambda r: None,
        on_wake: Callable[[str], Awaitable[object]] | None = None,
    ) -> None:
        """on_wake(name): wake an idle model for a worker's waiting requests (SPEC §12); idempotent, returns once
        it has a ready replica, raises GpudError (its message for the clients) when it cannot."""
        self.registry = registry
        self.settings = settings
        self.run_dir = run_dir
        self.instance = instance
        self.ledger_rows = ledger_rows
        self.on_connect_failure = on_connect_failure
        self.on_wake = on_wake
        # One row per worker: a routing decision sums as many rows as there are workers.
        self.counters, self._counters_fd = Counters.create(workers=settings.workers)
        self.feed = Feed(registry, self.counters, ledger_rows)
        self._workers = [_Worker(i) for i in range(settings.workers)]
        self._table = b""
        self._sent: dict[int, RouteTable] = {}  # tables sent but not yet applied by every worker, by version
        self._push_pending = False
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reservation: socket.socket | None = None
        self._metrics_dir = run_dir / "metrics"

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every worker and wait until each listens; GpudError when the address cannot be had."""
        settings = self.settings
        self._reserve_address(settings.listen_host, settings.listen_port)
        shutil.rmtree(self._metrics_dir, ignore_errors=True)  # the counts of an earlier life are not ours
        self._metrics_dir.mkdir(parents=True)
        self.registry.on_change(self._schedule_push)
        self._table = self._build()
        for worker in self._workers:
            await self._spawn(worker)
        try:
            await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in self._workers)), READY_TIMEOUT_SEC)
        except asyncio.TimeoutError:
            raise GpudError(f"The proxy workers did not start listening on {settings.listen} within "
                            f"{READY_TIMEOUT_SEC:g} s; see the daemon log.") from None
        self._background(self._sync())

    async def drain(self) -> None:
        """Shutdown begins: workers stop accepting; open connections go on (replicas drain them)."""
        self._closing = True
        for worker in self._workers:
            self._send(worker, {"t": "drain"})

    async def close(self) -> None:
        """Stop every worker (SIGTERM, SIGKILL after STOP_TIMEOUT_SEC) and let go of the address. Safe twice."""
        if self._counters_fd < 0:
            return
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        procs = [w.proc for w in self._workers if w.proc is not None and w.proc.returncode is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), STOP_TIMEOUT_SEC)
        except asyncio.TimeoutError:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in self._workers:
            if worker.writer is not None:
                worker.writer.close()
        if self._reservation is not None:
            self._reservation.close()
        os.close(self._counters_fd)
        self._counters_fd = -1
        self.counters.close()
        shutil.rmtree(self._metrics_dir, ignore_errors=True)

    # ---- one worker -----------------------------------------------------------------------------------
    async def _spawn(self, worker: _Worker) -> None:
        self._metrics_dir.mkdir(parents=True, exist_ok=True)  # a worker cannot start without it
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        settings = asdict(self.settings)
        job = {
            "index": worker.index, "host": self.settings.listen_host, "port": self.settings.listen_port,
            "settings": {**settings, "api_keys": list(settings["api_keys"])}, "parent_pid": os.getpid(),
            "counters_fd": self._counters_fd, "metrics_dir": str(self._metrics_dir),
        }
        env = {**os.environ, MULTIPROC_ENV: str(self._metrics_dir), WORKER_ENV: self.instance}
        worker.ready.clear()
        if worker.writer is not None:  # the link of the worker's previous life
            worker.writer.close()
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gpud.proxy.worker", str(theirs.fileno()),
            pass_fds=(self._counters_fd, theirs.fileno()), stdin=asyncio.subprocess.DEVNULL, env=env,
            start_new_session=True,
        )
        theirs.close()
        reader, worker.writer = await asyncio.open_unix_connection(sock=ours, limit=2**20)
        # The job first, over the link: it holds the API keys, which a command line would show to every user.
        self._send(worker, {"t": "job", "job": job})
        self._send(worker, {"t": "table", "table": None}, raw=self._table)
        self._background(self._listen(worker, reader))
        self._background(self._watch(worker, worker.proc))

    async def _listen(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        async for line in reader:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            kind = message.get("t")
            if kind == "ready":
                worker.ready.set()
            elif kind == "applied":
                worker.applied = int(message.get("version", 0))
                self._settle()
            elif kind == "wake":
                self._background(self._wake(str(message.get("model"))))
            elif kind == "connect_failed":
                model = self.registry.get(str(message.get("model")))
                replica = model.replicas.get(message.get("index", -1)) if model is not None else None
                if replica is not None:
                    self.on_connect_failure(replica)

    async def _watch(self, worker: _Worker, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self._closing:
            return
        # Its connections died with it; what it counted as in flight is not in flight any more. It no longer
        # holds any table back either.
        self.counters.forget_row(worker.index)
        self._settle()
        delay = _RESTART_DELAYS[min(worker.restarts, len(_RESTART_DELAYS) - 1)]
        log.warning("proxy worker %d (pid %d) exited with %s; starting it again in %g s", worker.index,
                    proc.pid, code, delay)
        worker.restarts += 1
        await asyncio.sleep(delay)
        if not self._closing:
            await self._spawn(worker)
            self._background(self._forgive(worker))

    async def _forgive(self, worker: _Worker) -> None:
        """A worker that stays up a minute has its restart delay start from the shortest again."""
        await asyncio.sleep(60)
        if worker.proc is not None and worker.proc.returncode is None:
            worker.restarts = 0

    async def _wake(self, name: str) -> None:
        """A worker holds requests for `name`: wake it (one wake, however many workers ask). Its readiness
        reaches the workers with the route table that has its ready replica; a failure is told to them all."""
        if self.on_wake is None:
            failure = f"Model '{name}' cannot be woken here."
        else:
            try:
                await self.on_wake(name)
                return
            except GpudError as exc:
                failure = exc.message
            except Exception:  # a bug must not leave requests waiting for an answer that never comes
                log.exception("model %s: wake failed", name)
                failure = f"Model '{name}' could not be woken (see the daemon log)."
        for worker in self._workers:
            self._send(worker, {"t": "wake_failed", "model": name, "reason": failure})

    # ---- the table and the counters -------------------------------------------------------------------
    def _build(self) -> bytes:
        table = self.feed.table()
        self._sent[table.version] = table
        if len(self._sent) > _UNACKED_TABLES:  # a worker that stopped answering must not grow the daemon
            del self._sent[min(self._sent)]
        return table.to_json()

    def _settle(self) -> None:
        """Once every live worker applied a table, what it withdrew from the balancer is withdrawn (the drain
        of SPEC §7 relies on it) and older tables are forgotten."""
        live = [w for w in self._workers if w.proc is not None and w.proc.returncode is None and w.ready.is_set()]
        if not live:
            return
        version = min(w.applied for w in live)
        table = self._sent.get(version)
        if table is None:
            return
        for old in [v for v in self._sent if v < version]:
            del self._sent[old]
        self.feed.applied(table)

    def _schedule_push(self) -> None:
        if not self._push_pending:
            self._push_pending = True
            asyncio.get_running_loop().call_soon(self._push)

    def _push(self) -> None:
        self._push_pending = False
        table = self._build()
        self._table = table
        for worker in self._workers:
            self._send(worker, {"t": "table", "table": None}, raw=table)

    def _send(self, worker: _Worker, message: dict[str, Any], raw: bytes | None = None) -> None:
        writer = worker.writer
        if writer is None or writer.is_closing():
            return
        data = json.dumps(message).encode()
        if raw is not None:  # the table is JSON already: splice it in rather than parse and dump it again
            data = data.replace(b'"table": null', b'"table": ' + raw, 1)
        writer.write(data + b"\n")

    async def _sync(self) -> None:
        """Copy the workers' counts into the registry, for the readers of the daemon's side."""
        ledger_seen = json.dumps(self.ledger_rows(), sort_keys=True)
        tick = 0
        while True:
            try:
                self.feed.copy_counts()
                tick += 1
                if tick % 40 == 0:  # every 2 s: the ledger moves with NVML readings, not only with the registry
                    seen = json.dumps(self.ledger_rows(), sort_keys=True)
                    if seen != ledger_seen:
                        ledger_seen = seen
                        self._push()
            except Exception:  # one failed pass (a ledger reading) must not stop the copying for good
                log.exception("copying the proxy workers' counts failed; trying again")
            await asyncio.sleep(SYNC_SEC)

    # ---- helpers --------------------------------------------------------------------------------------
    def _reserve_address(self, host: str, port: int) -> None:
        # Bound, never listening: it holds the address for the workers' group without taking connections.
        try:
            sock = bound_socket(host, port, reuse_port=True)
        except OSError as exc:
            raise bind_error(host, port, exc) from None
        if port == 0:  # tests: the kernel's pick is the address every worker binds
            self.settings = _with_port(self.settings, sock.getsockname()[1])
        self._reservation = sock

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def address(self) -> tuple[str, int]:
        return self.settings.listen_host, self.settings.listen_port


def _with_port(settings: ProxySettings, port: int) -> ProxySettings:
    from dataclasses import replace

    return replace(settings, listen_port=port)
