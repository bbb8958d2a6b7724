"""Helpers of the `gpud ui` tests (tests/ui/): a `gpud ui` subprocess, and where Chromium is."""

from __future__ import annotations

import http.client
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

# Chromium on this closed network: no sandbox as root, no GPU, and none of the background connections
# (updates, sync, field trials) that would be refused, many at a time, at every start.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-features=Translate,OptimizationHints,MediaRouter",
]


def chromium_path() -> str | None:
    """Debian's chromium (`.ci/run` installs it), or GPUD_TEST_CHROMIUM."""
    return os.environ.get("GPUD_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class UiProcess:
    """`gpud ui --listen 127.0.0.1:0 --no-open` as a subprocess, its stdout a pipe (the URL must still come)."""

    def __init__(self, socket_path: str, root: Path, *extra: str) -> None:
        self.socket_path = socket_path
        self.root = root
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 15.0) -> UiProcess:
        self.stderr = open(self.root / "ui.err", "ab")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "GPUD_SOCKET")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpud", "--socket", self.socket_path, "ui", *(self.extra or
             ("--listen", "127.0.0.1:0")), "--no-open"],
            stdout=subprocess.PIPE, stderr=self.stderr, env=env,
        )
        self.url = self.read_line(timeout)
        return self

    def read_line(self, timeout: float) -> str:
        """The next line of stdout, or fail after `timeout` (a URL left in a pipe buffer would hang here)."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        buffer = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while not buffer.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise AssertionError(f"gpud ui printed no line within {timeout} s: {self.stderr_text()}")
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise AssertionError(f"gpud ui exited with {self.proc.wait()}: {self.stderr_text()}")
                buffer += chunk
        return buffer.decode().strip()

    def stderr_text(self) -> str:
        return (self.root / "ui.err").read_text(errors="replace")

    @property
    def origin(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def token(self) -> str:
        return urlsplit(self.url).query.removeprefix("token=")

    def connection(self) -> http.client.HTTPConnection:
        parts = urlsplit(self.url)
        return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One plain HTTP request (no browser): (status, headers, body)."""
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("gpud ui did not exit within 10 s of SIGTERM") from None
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()
        code = self.proc.returncode
        self.proc = None
        return code
