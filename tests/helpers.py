"""Helpers shared by the tests: a real gpud daemon on simulated GPUs, waiting on conditions, raw connections."""

from __future__ import annotations

import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

from gpud.cli.client import Client, model_path
from gpud.config import ProxySettings
from gpud.daemon import instance_id
from gpud.errors import GpudError
from gpud.proxy.server import Proxy
from gpud.registry import Registry
from gpud.supervise import procs
from gpud.supervise.supervisor import INSTANCE_ENV, free_port

# Fast supervision timings so that failures and restarts show within a test's patience.
FAST_CONFIG = """
[supervisor]
health_interval_sec = 0.3
restart_sec = 0.05
restart_max_delay_sec = 0.4
stop_timeout_sec = 5
drain_timeout_sec = 5
"""


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy, or fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (GpudError, OSError, KeyError, IndexError) as exc:
            last_exc, value = exc, None
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_exc})")


class Daemon:
    """A `gpud daemon` subprocess with its own socket, state dir and proxy port."""

    def __init__(self, root: Path, gpus: str = "sim:2x80GiB", config: str = FAST_CONFIG,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.gpus = gpus
        self.socket = str(root / "gpud.sock")
        self.state_dir = root / "state"
        self.config_path = root / "gpud.toml"
        self.config_path.write_text(config)
        self.port = free_port(set())
        self.env = {**os.environ, **(env or {})}
        self.env.pop("GPUD_SOCKET", None)
        self.client = Client(self.socket, timeout=30)
        self.proc: subprocess.Popen[bytes] | None = None
        self.instance = instance_id(self.state_dir)

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *extra: str, wait: bool = True) -> Daemon:
        self.log = open(self.root / "daemon.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpud", "daemon", "--config", str(self.config_path), "--gpus", self.gpus,
             "--socket", self.socket, "--state-dir", str(self.state_dir), "--listen", f"127.0.0.1:{self.port}",
             *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
        )
        if wait:
            wait_until(lambda: self._alive() and self.client.request("GET", "/v1/status").get("ready"), 20,
                       "daemon to be ready")
        return self

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
        return True

    def log_text(self) -> str:
        return (self.root / "daemon.log").read_text(errors="replace")

    def cli(self, *args: str, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gpud", "--socket", self.socket, *args],
            capture_output=True, text=True, timeout=timeout, env=self.env, input=input,
        )

    def show(self, name: str) -> dict[str, Any]:
        return self.client.request("GET", model_path(name))

    def start_model(self, body: dict[str, Any], settle: bool = True) -> dict[str, Any]:
        shown = self.client.request("POST", "/v1/models", body)
        if settle:
            return self.wait_idle(shown["name"])
        return shown

    def wait_idle(self, name: str, timeout: float = 30) -> dict[str, Any]:
        return wait_until(lambda: (m := self.show(name)) and not m["busy"] and m, timeout, f"{name} to settle")

    def wait_removed(self, name: str, timeout: float = 30) -> None:
        wait_until(lambda: name not in {m["name"] for m in self.client.request("GET", "/v1/models")["models"]},
                   timeout, f"{name} to be removed")

    def replica_pids(self) -> list[int]:
        return replica_processes(self.instance)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.log.close()
                self.proc = None
                raise AssertionError(f"the daemon did not exit within {timeout} s of signal {sig}") from None
        self.log.close()
        code = self.proc.returncode
        self.proc = None
        return code


def control_connection(daemon: Daemon) -> http.client.HTTPConnection:
    """A raw HTTP connection to the daemon's control socket, for requests the Client would not send."""
    conn = http.client.HTTPConnection("localhost", timeout=10)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(daemon.socket)
    conn.sock = sock
    return conn


def raw_request(daemon: Daemon, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    """One request on the control socket: (status, the JSON body or None)."""
    conn = control_connection(daemon)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def idle_standby(pid: int) -> bool:
    """A parent shim started ahead of need (gpud.supervise.standby) that has no replica yet: it carries the
    daemon's marker but is no replica's process."""
    try:
        proc = psutil.Process(pid)
        return "--standby" in proc.cmdline() and not proc.children()
    except psutil.Error:
        return False


def replica_processes(instance: str) -> list[int]:
    """The processes of the replicas of the daemon `instance` (shims, engines, their children)."""
    return [pid for pid in procs.find_orphans(INSTANCE_ENV, instance) if not idle_standby(pid)]


def kill_leftovers(instance: str) -> list[int]:
    """SIGKILL what is left of the daemon `instance`; returns the replica processes among them (an idle
    standby shim of a daemon that was just killed may still be on its way out: killed, not reported)."""
    found = procs.find_orphans(INSTANCE_ENV, instance)
    left = [pid for pid in found if not idle_standby(pid)]
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left




class LocalProxy:
    """A Proxy in this process fed from a Registry, as the daemon feeds its workers: the table is rebuilt after
    every registry change, and the in-flight counts are copied back into the registry every 10 ms."""

    def __init__(self, registry: Registry, *, on_connect_failure: Callable[[Any], None] | None = None,
                 gpus: Callable[[], Any] = tuple, **settings: Any) -> None:
        from gpud.proxy.counters import Counters
        from gpud.proxy.table import Feed

        self.registry = registry
        self.counters = Counters.local()
        self.feed = Feed(registry, self.counters, gpus)
        failed = on_connect_failure or (lambda replica: None)

        class Link:
            def connect_failed(self, model: str, index: int) -> None:
                found = registry.get(model)
                if found is not None and index in found.replicas:
                    failed(found.replicas[index])

            def wake(self, model: str) -> None:
                raise RuntimeError(f"a LocalProxy wakes nothing (model {model!r})")

        self.proxy = Proxy(ProxySettings(**settings), counters=self.counters, link=Link())
        self._task: Any = None

    def refresh(self) -> None:
        table = self.feed.table()
        self.proxy.set_table(table)
        self.feed.applied(table)  # in this process the proxy applies a table at once

    def render(self) -> tuple[bytes, str]:
        """The proxy's /metrics exposition."""
        return self.proxy.metrics.render(self.proxy.table, self.counters)

    async def start(self) -> tuple[str, int]:
        import asyncio

        loop = asyncio.get_running_loop()
        self.registry.on_change(lambda: loop.call_soon(self.refresh))
        self.refresh()
        await self.proxy.start("127.0.0.1", 0)

        async def copy() -> None:
            while True:
                self.feed.copy_counts()
                await asyncio.sleep(0.01)

        self._task = loop.create_task(copy())
        return self.proxy.address

    async def close(self) -> None:
        import asyncio

        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.proxy.close()


# ---- in-process harness: the supervisor and the service inside the test's own event loop ----------------

# A tiny engine for the `command` engine: an HTTP server on {port} whose answers and lifetime the test sets
# through its environment (STATUS: the code every GET answers; MISSING: a path that answers 404, as /health
# does on servers without one; EXIT_AFTER: exit with EXIT_CODE after that many seconds).
TINY_SERVER = (
    "import http.server, os, sys, threading\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        missing = self.path == os.environ.get('MISSING')\n"
    "        self.send_response(404 if missing else int(os.environ.get('STATUS', '200'))); self.end_headers()\n"
    "    def log_message(self, *a): pass\n"
    "after = os.environ.get('EXIT_AFTER')\n"
    "if after: threading.Timer(float(after), lambda: os._exit(int(os.environ.get('EXIT_CODE', '3')))).start()\n"
    "http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
)


def tiny_command() -> str:
    """The --command template that runs TINY_SERVER."""
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(TINY_SERVER)} {{port}}"


def tiny_engine_body(name: str = "tiny", **fields: Any) -> dict[str, Any]:
    """A POST /v1/models body running TINY_SERVER through the command engine."""
    return {"name": name, "model": name, "engine": "command", "command": tiny_command(), "vram": "10GiB", **fields}


FAST_SUPERVISOR = {"health_interval_sec": 0.2, "restart_sec": 0.05, "restart_max_delay_sec": 0.2,
                   "stop_timeout_sec": 5, "drain_timeout_sec": 2}


class InProcess:
    """A ModelService with its Supervisor, Ledger and Registry on sim GPUs, in the running event loop."""

    def __init__(self, root: Path, gpus: str = "sim:2x80GiB", backend: Any = None, **supervisor: Any) -> None:
        from gpud.config import Settings, SupervisorSettings
        from gpud.control.service import ModelService
        from gpud.control.state import StateStore
        from gpud.gpus import SimBackend, parse_sim_spec
        from gpud.gpus.ledger import Ledger, OwnedPids
        from gpud.supervise.supervisor import Supervisor

        self.root = root
        self.instance = f"inproc-{os.getpid()}-{id(self):x}"
        # Another backend (e.g. NVML over the fake pynvml) may stand in for the simulated GPUs.
        self.backend = backend or SimBackend(parse_sim_spec(gpus))
        self.owned = OwnedPids()
        self.ledger = Ledger(self.backend, headroom_bytes=0, owned=self.owned)
        self.registry = Registry()
        settings = SupervisorSettings(**{**FAST_SUPERVISOR, **supervisor})
        self.supervisor = Supervisor(self.registry, self.ledger, settings, owned=self.owned, state_dir=root,
                                     config_env={}, instance=self.instance)
        self.settings = Settings(config_path=None, socket=str(root / "s.sock"), socket_group=None, state_dir=root,
                                 gpus=gpus, headroom_bytes=0, supervisor=settings)
        self.service = ModelService(self.settings, self.registry, self.ledger, self.supervisor, StateStore(root))

    def reserved(self) -> list[int]:
        return [self.ledger.reserved(d.index) for d in self.ledger.devices()]

    async def wait(self, predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
        """Wait on registry events until `predicate()` is truthy (re-checked at least every 50 ms)."""
        import asyncio

        deadline = time.monotonic() + timeout
        queue = self.registry.subscribe()
        try:
            while not (value := predicate()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
                try:
                    await asyncio.wait_for(queue.get(), min(left, 0.05))
                except asyncio.TimeoutError:
                    pass
            return value
        finally:
            self.registry.unsubscribe(queue)

    async def close(self) -> None:
        await self.service.shutdown()
        left = procs.find_orphans(INSTANCE_ENV, self.instance)
        assert not left, f"replica processes outlived the supervisor: {left}"


def run_in_process(test: Callable[[InProcess], Awaitable[None]], root: Path, **settings: Any) -> None:
    """Run `test(harness)` in a fresh event loop with an InProcess harness; fails after 60 s."""
    import asyncio

    async def main() -> None:
        harness = InProcess(root, **settings)
        try:
            await asyncio.wait_for(test(harness), 60)
        finally:
            await harness.close()

    asyncio.run(main())
