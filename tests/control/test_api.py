"""Control API edges: errors as JSON with the documented codes, never a 500 for bad input, peer checks."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from helpers import Daemon, raw_request

from gpud.cli.client import model_path
from gpud.control.api import peer_allowed


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/v1/models", b"{not json", 422, "invalid"),
        ("POST", "/v1/models", b"[1, 2]", 422, "invalid"),
        ("POST", "/v1/models", b'{"model": "m", "replicas": 1e400}', 422, "invalid"),
        ("POST", "/v1/models", b'{"model": "m", "vram": {"a": 1}}', 422, "invalid"),
        # SPEC §2: a name has 1-128 characters; an explicit empty one is not "no name".
        ("POST", "/v1/models", b'{"model": "m", "engine": "sim", "name": ""}', 422, "invalid"),
        # A local MODEL must be absolute on the daemon's side (the CLI makes it so) and exist.
        ("POST", "/v1/models", b'{"model": "./m", "engine": "sim"}', 422, "invalid"),
        ("POST", "/v1/models", b'{"model": "/no/such/gpud/model", "engine": "sim"}', 422, "invalid"),
        ("POST", "/v1/plan", b'{"replicas": -1}', 422, "invalid"),
        # The sim engine's args are checked before anything starts (SPEC §13's prefix cache among them).
        ("POST", "/v1/models", b'{"model": "m", "engine": "sim", "args": ["--prefix-cache-tokens", "-1"]}', 422,
         "invalid"),
        ("GET", "/v1/models/nope", None, 404, "not_found"),
        ("PATCH", "/v1/models/nope", b'{"replicas": 2}', 404, "not_found"),
        ("DELETE", "/v1/models/nope", None, 404, "not_found"),
        ("POST", "/v1/models/nope/restart", b"{}", 404, "not_found"),
        ("GET", "/v1/models/nope/logs", None, 404, "not_found"),
        ("GET", "/v1/nothing", None, 404, "not_found"),
        ("PUT", "/v1/gpus", None, 404, "not_found"),
    ],
)
def test_errors_are_json_with_documented_codes(daemon: Daemon, method: str, path: str, body: bytes | None,
                                                status: int, code: str) -> None:
    got, payload = raw_request(daemon, method, path, body)
    assert (got, payload["error"]["code"]) == (status, code)
    assert payload["error"]["message"].endswith(".")


def test_bad_patch_and_restart_bodies(daemon: Daemon) -> None:
    daemon.start_model({"model": "Org/m", "engine": "sim", "vram": "1GiB"})
    for body in (b'{"replicas": 0}', b'{"replicas": "2"}', b'{"replica": 2}', b"{}", b"null"):
        status, payload = raw_request(daemon, "PATCH", model_path("Org/m"), body)
        assert status == 422, body
    status, _ = raw_request(daemon, "POST", model_path("Org/m", "restart"), b'{"rolling": "yes"}')
    assert status == 422
    status, payload = raw_request(daemon, "GET", model_path("Org/m"))
    assert status == 200 and payload["name"] == "Org/m" and payload["replicas_desired"] == 1


def test_plan_shapes(daemon: Daemon) -> None:
    fits = daemon.client.request("POST", "/v1/plan", {"replicas": 3, "vram": "20GiB"})
    assert fits == {"fits": True, "reason": None, "replicas": [
        {"index": 0, "gpus": [0], "vram_bytes": 20 * 2**30},
        {"index": 1, "gpus": [1], "vram_bytes": 20 * 2**30},
        {"index": 2, "gpus": [0], "vram_bytes": 20 * 2**30}], "estimate": None}  # SPEC §11: null without auto
    refused = daemon.client.request("POST", "/v1/plan", {"replicas": 2, "vram": "79.9GiB"})
    assert refused["fits"] is False and refused["replicas"] == [] and "GPU0" in refused["reason"]


def test_peer_rules() -> None:
    assert peer_allowed(0, 0, None)
    assert peer_allowed(os.geteuid(), 0, None)
    assert not peer_allowed(65534, 65534, None)
    assert not peer_allowed(65534, 65534, "no-such-group-here")


def _status_line_as(uid: int, path: str) -> str:
    """GET /v1/status from a forked child that has dropped to `uid` (no exec: the interpreter may be unreadable)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            os.write(write_end, data.split(b"\r\n", 1)[0])
        except BaseException as exc:
            os.write(write_end, f"error: {exc}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        line = fh.read().decode()
    os.waitpid(pid, 0)
    return line


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_other_users_get_403_even_through_an_open_socket(daemon: Daemon) -> None:
    # Open every door on purpose: SO_PEERCRED must still refuse.
    os.chmod(os.path.dirname(daemon.socket), 0o755)
    os.chmod(os.path.dirname(os.path.dirname(daemon.socket)), 0o755)
    assert _status_line_as(65534, daemon.socket).startswith("error: [Errno 13]")  # the socket itself is 0660
    os.chmod(daemon.socket, 0o666)
    assert _status_line_as(65534, daemon.socket) == "HTTP/1.1 403 Forbidden"


def test_a_left_event_stream_does_not_hold_up_shutdown(daemon: Daemon) -> None:
    # What `gpud model stop` does: follow the model's events until it is removed, then hang up. The
    # daemon's handler then waits for events that never come; it must still not hold up the shutdown.
    daemon.start_model({"model": "e", "engine": "sim", "vram": "1GiB"})
    lines = daemon.client.stream_lines("/v1/events", {"model": "e"}, timeout=30)
    assert json.loads(next(lines))["type"] == "model"
    daemon.client.request("DELETE", model_path("e"))
    while json.loads(next(lines))["type"] != "removed":
        pass
    lines.close()
    assert daemon.stop(timeout=15) == 0


def test_a_request_line_over_the_limit_is_a_4xx_and_one_debug_line(daemon: Daemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(daemon.socket)
        sock.sendall(b"GET /v1/" + b"x" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.split(b" ")[1].startswith(b"4")  # aiohttp answers 400 (as HTTP/1.0)
    assert daemon.client.request("GET", "/v1/status")["models"] == 0  # still serving
    log = daemon.log_text()
    assert "Traceback" not in log and "ERROR" not in log


def test_a_local_path_model_is_served_under_its_last_component(daemon: Daemon, short_tmp: Path) -> None:
    model_dir = short_tmp / "Qwen2.5-0.5B-Instruct"
    model_dir.mkdir()
    shown = daemon.start_model({"model": str(model_dir), "engine": "sim", "vram": "1GiB"})
    assert (shown["name"], shown["model"], shown["state"]) == ("Qwen2.5-0.5B-Instruct", str(model_dir), "running")
    gguf = short_tmp / "tiny-q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    shown = daemon.start_model({"model": str(gguf), "engine": "sim", "vram": "1GiB"})
    assert shown["name"] == "tiny-q8_0"
