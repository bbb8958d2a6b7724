"""Shared fixtures: a real gpud daemon on simulated GPUs, and a guard that no replica process outlives a test."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpud.cli.client import Client, model_path
from gpud.daemon import instance_id
from gpud.errors import GpudError
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
            wait_until(lambda: self._alive() and self.client.request("GET", "/v1/status"), 20, "daemon to listen")
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
        return procs.find_orphans(INSTANCE_ENV, self.instance)

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


def _kill_leftovers(instance: str) -> list[int]:
    left = procs.find_orphans(INSTANCE_ENV, instance)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: Unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="gpud-t-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_daemon(short_tmp: Path) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def factory(**kwargs: Any) -> Daemon:
        root = short_tmp / f"d{len(made)}"
        root.mkdir()
        daemon = Daemon(root, **kwargs)
        made.append(daemon)
        return daemon

    yield factory
    leftovers: list[int] = []
    for daemon in made:
        daemon.stop()
        # SPEC §7: no process of a replica outlives the daemon. Give the shims their stop time, then check.
        try:
            wait_until(lambda d=daemon: not d.replica_pids(), 10, "replica processes to go")
        except AssertionError:
            leftovers += _kill_leftovers(daemon.instance)
    assert not leftovers, f"replica processes outlived the daemon: {leftovers}"


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon().start()


@pytest.fixture(scope="module")
def fuzz_daemon() -> Iterator[Daemon]:
    """One daemon shared by a module's property-test examples (starting one per example would be slow)."""
    root = Path(tempfile.mkdtemp(prefix="gpud-f-", dir="/tmp"))
    daemon = Daemon(root).start()
    yield daemon
    daemon.stop()
    wait_until(lambda: not daemon.replica_pids(), 10, "replica processes to go")
    shutil.rmtree(root, ignore_errors=True)
