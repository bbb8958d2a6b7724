#!/usr/bin/env python3
"""A stand-in for the `vllm` executable, for tests of the vllm engine through a real daemon.

tests/engines/test_vllm_engine.py copies this file to TMP/bin/vllm with a `#!{sys.executable}` shebang and puts
TMP/bin first on the daemon's PATH, so that gpud's `vllm serve MODEL --host H --port P …` runs it.

It behaves like vLLM where gpud can tell:

* `vllm serve MODEL … --host H --port P …`: after a startup delay (the model load), it listens on H:P and
  answers `GET /health` with 200 — vLLM opens its port only once the engine is loaded. It also answers
  `POST /v1/completions` (and chat) with a tiny OpenAI-shaped body naming itself, so tests can go
  through gpud's proxy.
* It starts a grandchild in a session of its own, like vLLM's EngineCore (a separate process that holds
  the GPU memory), and on SIGTERM it exits WITHOUT stopping that grandchild: cleaning it up is gpud's job.

What it saw and did goes to `$FAKE_VLLM_RECORDS/<pid>.json` (rewritten atomically at each step):
argv, environment, cwd, pid, the grandchild's pid, and `time.monotonic()` stamps for start, ready and
SIGTERM. CLOCK_MONOTONIC is one clock for the whole machine on Linux, so stamps of different processes
compare.

Knobs (environment): FAKE_VLLM_STARTUP_S (seconds before listening, default 0.2);
FAKE_VLLM_BARRIER=N (do not become ready before N invocations have recorded themselves, up to 20 s: a
proof that N replicas were starting at the same time).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

BARRIER_TIMEOUT_S = 20.0


class Recorder:
    """The JSON record of one invocation."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{os.getpid()}.json"
        self.data: dict[str, Any] = {
            "argv": sys.argv,
            "env": dict(os.environ),
            "cwd": os.getcwd(),
            "pid": os.getpid(),
            "started": time.monotonic(),
        }

    def write(self, **update: Any) -> None:
        self.data.update(update)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)  # readers never see half a record


def option(argv: list[str], flag: str) -> str:
    """The value of `--flag VALUE` (as gpud passes them); exits 2 like argparse when it is missing."""
    try:
        return argv[argv.index(flag) + 1]
    except (ValueError, IndexError):
        print(f"vllm: error: the following arguments are required: {flag}", file=sys.stderr)
        raise SystemExit(2) from None


def make_handler(name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/health":
                self._reply(200, b"")
            else:
                self._reply(404, b'{"error": "not found"}')

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            if self.path in ("/v1/completions", "/v1/chat/completions"):
                body = {"object": "text_completion", "model": name, "fake_vllm_pid": os.getpid(),
                        "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]}
                self._reply(200, json.dumps(body).encode())
            else:
                self._reply(404, b'{"error": "not found"}')

        def _reply(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep the log quiet
            pass

    return Handler


def wait_barrier(records: Path, count: int, stop: threading.Event) -> bool:
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while time.monotonic() < deadline and not stop.is_set():
        if len(list(records.glob("*.json"))) >= count:
            return True
        stop.wait(0.02)
    return False


def serve(argv: list[str]) -> int:
    records = Path(os.environ["FAKE_VLLM_RECORDS"])
    recorder = Recorder(records)
    stop = threading.Event()
    term_at: list[float] = []

    def on_term(signum: int, _frame: object) -> None:
        # Only note it: the main thread writes the record (a handler writing it could interleave with it).
        term_at.append(time.monotonic())
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    # The EngineCore stand-in: its own session, so only a tree walk (not the process group) finds it.
    core = subprocess.Popen(
        [sys.executable, "-c", "import time\nwhile True: time.sleep(60)"],
        start_new_session=True, stdin=subprocess.DEVNULL,
    )
    recorder.write(engine_core_pid=core.pid)
    try:
        run(argv, recorder, records, stop)
    finally:
        if term_at:
            recorder.write(sigterm=term_at[0])
    # Deliberately NOT stopping `core`: vLLM's EngineCore can outlive its API server; gpud must reap it.
    return 0


def run(argv: list[str], recorder: Recorder, records: Path, stop: threading.Event) -> None:
    """Load (sleep), then serve until SIGTERM."""
    host, port, name = option(argv, "--host"), int(option(argv, "--port")), option(argv, "--served-model-name")
    option(argv, "--gpu-memory-utilization")
    if stop.wait(float(os.environ.get("FAKE_VLLM_STARTUP_S", "0.2"))):
        return
    barrier = os.environ.get("FAKE_VLLM_BARRIER")
    if barrier:
        recorder.write(barrier_met=wait_barrier(records, int(barrier), stop))

    server = ThreadingHTTPServer((host, port), make_handler(name))
    recorder.write(ready=time.monotonic())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stop.wait()
    server.shutdown()
    server.server_close()


def main() -> int:
    argv = sys.argv[1:]
    if not argv or argv[0] != "serve" or len(argv) < 2:
        print("usage: vllm serve MODEL [options]", file=sys.stderr)
        return 2
    return serve(argv)


if __name__ == "__main__":
    raise SystemExit(main())
