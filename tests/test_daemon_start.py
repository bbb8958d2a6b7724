"""The daemon refuses to start with one clear sentence and the documented exit code, leaving nothing behind."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from helpers import Daemon


def run_daemon(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpud", "daemon", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_sentence(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpud: "), stderr
    return lines[0]


def test_auto_without_nvidia_suggests_sim(short_tmp: Path) -> None:
    out = run_daemon("--gpus", "auto", "--socket", str(short_tmp / "s"), "--state-dir", str(short_tmp / "st"))
    assert out.returncode == 1
    assert "--gpus sim:2x24GiB" in one_sentence(out.stderr)
    assert not (short_tmp / "s").exists()


def test_bad_gpu_spec_and_bad_config_are_exit_2(short_tmp: Path) -> None:
    out = run_daemon("--gpus", "sim:2x80GiB@90GiB", "--socket", str(short_tmp / "s"))
    assert out.returncode == 2 and "90GiB" in one_sentence(out.stderr)
    config = short_tmp / "bad.toml"
    config.write_text("[proxy]\nlisen = '1'\n")
    out = run_daemon("--config", str(config), "--gpus", "sim:1x8GiB", "--socket", str(short_tmp / "s"))
    assert out.returncode == 2 and "'proxy.lisen'" in one_sentence(out.stderr) and str(config) in out.stderr
    out = run_daemon("--gpus", "sim:1x8GiB", "--listen", "localhost", "--socket", str(short_tmp / "s"))
    assert out.returncode == 2 and "HOST:PORT" in one_sentence(out.stderr)


def test_second_daemon_on_the_same_socket_is_refused(daemon: Daemon, short_tmp: Path) -> None:
    out = run_daemon("--gpus", "sim:1x8GiB", "--socket", daemon.socket, "--state-dir", str(short_tmp / "other"),
                     "--listen", "127.0.0.1:0")
    assert out.returncode == 1 and "already listening" in one_sentence(out.stderr)
    assert daemon.client.request("GET", "/v1/status")["pid"] == daemon.proc.pid  # the first one is untouched


def test_proxy_port_in_use_is_refused_and_socket_removed(short_tmp: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_daemon("--gpus", "sim:1x8GiB", "--socket", str(short_tmp / "s"), "--state-dir",
                         str(short_tmp / "st"), "--listen", f"127.0.0.1:{port}")
    assert out.returncode == 1 and str(port) in one_sentence(out.stderr)
    assert not (short_tmp / "s").exists()
