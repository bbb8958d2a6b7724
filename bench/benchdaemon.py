"""A gpud daemon for benchmarks: started on simulated GPUs, waited for, stopped with SIGTERM at the end."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpud.cli.client import Client  # noqa: E402 - after the path setup above
from gpud.supervise.supervisor import free_port  # noqa: E402


@dataclass
class BenchDaemon:
    proc: subprocess.Popen[bytes]
    client: Client
    socket: str
    port: int


@contextlib.contextmanager
def running_daemon(workdir: Path, gpus: str, config: str = "", timeout: float = 30,
                   port: int | None = None) -> Iterator[BenchDaemon]:
    """`gpud daemon --gpus GPUS` with its socket, state and log under workdir, answering before it is yielded;
    its proxy on `port` (None: a free one)."""
    sock = str(workdir / "gpud.sock")
    port = port or free_port(set())
    (workdir / "gpud.toml").write_text(config)
    log = open(workdir / "daemon.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpud", "daemon", "--config", str(workdir / "gpud.toml"), "--gpus", gpus,
         "--socket", sock, "--state-dir", str(workdir / "state"), "--listen", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    try:
        client = Client(sock, timeout=30)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the daemon exited with code {proc.returncode}; see {workdir / 'daemon.log'}")
            with contextlib.suppress(Exception):
                if client.request("GET", "/v1/status").get("ready"):
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"the daemon did not answer within {timeout:g} s")
            time.sleep(0.05)
        yield BenchDaemon(proc, client, sock, port)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
