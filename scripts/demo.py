"""The gpud demo: a daemon on two simulated 80 GiB GPUs, a model with 3 replicas, requests through the proxy.

Run it with `python3 dev.py demo`. Everything runs locally and stops at the end; nothing needs a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(tempfile.mkdtemp(prefix="gpud-demo-"))
SOCKET = str(ROOT / "gpud.sock")
ENV = {**os.environ, "GPUD_SOCKET": SOCKET}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpud(*args: str, check: bool = True, echo: bool = True) -> str:
    if echo:
        print(f"\n$ gpud {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "gpud", *args], env=ENV, text=True, capture_output=True)
    if echo:
        sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: `gpud {' '.join(args)}` exited with {proc.returncode}")
    return proc.stdout


def post(url: str, body: dict, stream: bool = False) -> tuple[str, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        replica = resp.headers["X-Gpud-Replica"]
        if not stream:
            return replica, json.loads(resp.read())["choices"][0]["text"]
        text = ""
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                piece = json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                print(piece, end="", flush=True)
                text += piece
        print()
        return replica, text


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"demo: timed out waiting for {what}")


def main() -> int:
    port = free_port()
    proxy = f"http://127.0.0.1:{port}"
    print(f"$ gpud daemon --gpus sim:2x80GiB --listen 127.0.0.1:{port} &   (state in {ROOT})")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "gpud", "daemon", "--gpus", "sim:2x80GiB", "--socket", SOCKET,
         "--state-dir", str(ROOT / "state"), "--listen", f"127.0.0.1:{port}", "--log-level", "warning"],
        env=ENV,
    )
    try:
        wait_for(lambda: subprocess.run([sys.executable, "-m", "gpud", "status"], env=ENV,
                                        capture_output=True).returncode == 0, 20, "the daemon")
        gpud("status")
        gpud("plan", "--replicas", "3", "--vram", "20GiB")
        gpud("model", "start", "demo", "--engine", "sim", "--replicas", "3", "--vram", "20GiB", "--env", "A=0")
        gpud("model", "show", "demo")
        gpud("gpus")

        print(f"\n# 6 requests through the proxy at {proxy}/v1 (least connections, ties rotate):")
        for i in range(6):
            replica, text = post(f"{proxy}/v1/completions", {"model": "demo", "prompt": "hi", "max_tokens": 4})
            print(f"  request {i}: answered by replica {replica}: {text!r}")
        print("\n# a streamed chat completion, token by token:")
        print("  ", end="")
        post(f"{proxy}/v1/chat/completions", {"model": "demo", "stream": True, "max_tokens": 12,
                                              "messages": [{"role": "user", "content": "hello"}]}, stream=True)

        shown = json.loads(gpud("model", "show", "demo", "-o", "json", echo=False))
        victim = shown["replicas"][1]
        print(f"\n$ kill -9 {victim['pid']}   # replica 1's engine process")
        os.kill(victim["pid"], signal.SIGKILL)

        def back():
            out = subprocess.run([sys.executable, "-m", "gpud", "model", "show", "demo", "-o", "json"], env=ENV,
                                 capture_output=True, text=True).stdout
            r = json.loads(out)["replicas"][1] if out else None
            return r if r and r["state"] == "ready" and r["restarts"] == 1 else None

        wait_for(back, 10, "replica 1 to be restarted")
        gpud("model", "show", "demo")
        gpud("model", "scale", "demo", "--replicas", "2")
        gpud("gpus")
        gpud("model", "stop", "demo")
        gpud("model", "list")
        print("\ndemo finished: the daemon stops every replica on SIGTERM.")
        return 0
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        shutil.rmtree(ROOT, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
