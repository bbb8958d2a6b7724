"""`gpud ui` over plain HTTP, in front of a real daemon: the URL it prints, 401 without the token, the cookie,
403 for a write from another origin, writes passed to the control API with its answers as they are, and
the live feed (SSE) with its snapshot and events."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path

import pytest
from helpers import Daemon, wait_until
from uihelpers import UiProcess

from gpud.cli.client import model_path
from gpud.errors import GpudError
from gpud.ui.security import cookie_name

SIM = {"engine": "sim", "args": ["--startup-s", "0.1"]}


@pytest.fixture
def cookie(ui: UiProcess) -> str:
    return f"{cookie_name(ui.token)}={ui.token}"


def same_origin(ui: UiProcess, cookie: str) -> dict[str, str]:
    return {"Cookie": cookie, "Origin": ui.origin, "Content-Type": "application/json"}


def test_the_url_names_the_listen_host_and_arrives_through_a_pipe(ui: UiProcess) -> None:
    assert ui.url.startswith("http://127.0.0.1:") and "/?token=" in ui.url
    assert len(ui.token) >= 43
    assert ui.proc is not None and ui.proc.poll() is None


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/app.css", "/api/events", "/api/v1/models",
                                  "/api/logs?model=x&replica=0", "/nothing"])
def test_every_request_without_the_token_is_401(ui: UiProcess, path: str) -> None:
    status, headers, body = ui.request("GET", path)
    assert status == 401
    assert b"URL that `gpud ui` printed" in body
    assert "set-cookie" not in headers
    status, _, _ = ui.request("GET", path, headers={"Cookie": f"{cookie_name(ui.token)}=forged"})
    assert status == 401


def test_the_token_becomes_an_httponly_samesite_cookie_and_leaves_the_url(ui: UiProcess) -> None:
    status, headers, _ = ui.request("GET", f"/?token={ui.token}")
    assert status == 303 and headers["location"] == "/"
    morsel = SimpleCookie(headers["set-cookie"])[cookie_name(ui.token)]
    assert morsel.value == ui.token
    assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/"
    status, headers, body = ui.request("GET", "/", headers={"Cookie": f"{cookie_name(ui.token)}={ui.token}"})
    assert status == 200 and b"<title>gpud</title>" in body
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "no-referrer"


def test_a_write_from_another_origin_is_403_and_changes_nothing(ui: UiProcess, ui_daemon: Daemon,
                                                                  cookie: str) -> None:
    body = json.dumps({"name": "forged", "model": "forged", **SIM}).encode()
    for origin in ("http://evil.example", "http://127.0.0.1:1", None):  # another site, another port, none
        headers = {"Cookie": cookie, "Content-Type": "application/json"}
        if origin:
            headers["Origin"] = origin
        status, _, answer = ui.request("POST", "/api/v1/models", body, headers)
        assert status == 403, origin
        assert json.loads(answer)["error"]["code"] == "forbidden"
    with pytest.raises(GpudError):
        ui_daemon.show("forged")


def test_writes_reach_the_daemon_and_its_answers_come_back_as_they_are(ui: UiProcess, ui_daemon: Daemon,
                                                                         cookie: str) -> None:
    bad = {"name": "huge", "model": "huge", "vram": "1000GiB", **SIM}
    with pytest.raises(GpudError) as refused:
        ui_daemon.client.request("POST", "/v1/models", bad)
    status, _, answer = ui.request("POST", "/api/v1/models", json.dumps(bad).encode(), same_origin(ui, cookie))
    assert status == 409
    assert json.loads(answer)["error"]["message"] == refused.value.message  # the daemon's sentence, unchanged

    good = {"name": "Org/via-ui", "model": "via-ui", "vram": "1GiB", **SIM}
    status, _, answer = ui.request("POST", "/api/v1/models", json.dumps(good).encode(), same_origin(ui, cookie))
    assert status == 201 and json.loads(answer)["name"] == "Org/via-ui"
    ui_daemon.wait_idle("Org/via-ui")
    encoded = "/api" + model_path("Org/via-ui")  # the name's "/" travels as %2F
    status, _, answer = ui.request("PATCH", encoded, json.dumps({"replicas": 0}).encode(), same_origin(ui, cookie))
    assert status == 422 and "from 1 to" in json.loads(answer)["error"]["message"]
    status, _, _ = ui.request("PATCH", encoded, json.dumps({"replicas": 2}).encode(), same_origin(ui, cookie))
    assert status == 200
    assert ui_daemon.wait_idle("Org/via-ui")["replicas_desired"] == 2
    status, _, _ = ui.request("DELETE", encoded, None, same_origin(ui, cookie))
    assert status == 202
    ui_daemon.wait_removed("Org/via-ui")


def test_routes_the_page_does_not_offer_never_reach_the_daemon(ui: UiProcess, cookie: str) -> None:
    for method, path in (("POST", "/api/v1/venvs/prune"), ("GET", "/api/v1/venvs"), ("POST", "/api/v1/plan")):
        status, _, answer = ui.request(method, path, b"{}", same_origin(ui, cookie))
        assert status == 404
        assert "gpud ui does not offer" in json.loads(answer)["error"]["message"]


def read_events(ui: UiProcess, cookie: str, until: str, timeout: float = 10.0) -> list[tuple[str, object]]:
    """Server-sent events of /api/events up to and including the first one named `until`."""
    conn = ui.connection()
    conn.timeout = timeout
    conn.request("GET", "/api/events", headers={"Cookie": cookie})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    events: list[tuple[str, object]] = []
    name = ""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            line = resp.readline().decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name == until:
                    return events
        raise AssertionError(f"no {until!r} event within {timeout} s: {events}")
    finally:
        conn.close()


def test_the_feed_starts_with_a_snapshot_of_the_box(ui: UiProcess, ui_daemon: Daemon, cookie: str) -> None:
    ui_daemon.start_model({"name": "snap", "model": "snap", "vram": "2GiB", **SIM})
    (name, snapshot), = read_events(ui, cookie, "snapshot")
    assert isinstance(snapshot, dict)
    assert [g["index"] for g in snapshot["gpus"]["gpus"]] == [0, 1, 2]
    assert "snap" in [m["name"] for m in snapshot["models"]]
    assert snapshot["ui"]["socket"] == ui_daemon.socket and "sim" in snapshot["ui"]["engines"]
    assert snapshot["status"]["version"]
    ui_daemon.client.request("DELETE", model_path("snap"))
    ui_daemon.wait_removed("snap")


def test_a_replica_log_is_its_tail_and_an_unknown_one_says_why(ui: UiProcess, ui_daemon: Daemon,
                                                                  cookie: str) -> None:
    conn = ui.connection()
    conn.request("GET", "/api/logs?model=nope&replica=0", headers={"Cookie": cookie})
    resp = conn.getresponse()
    text = resp.read(4096).decode()
    conn.close()
    assert "event: failure" in text and "No model named 'nope'" in text


@pytest.fixture
def lone_ui(tmp_path: Path) -> Iterator[UiProcess]:
    """A `gpud ui` whose daemon is not running."""
    proc = UiProcess(str(tmp_path / "none.sock"), tmp_path).start()
    yield proc
    assert proc.stop() == 0


def test_without_a_daemon_it_still_serves_and_says_so(lone_ui: UiProcess) -> None:
    # The URL is printed first, the warning once the first call to the daemon has failed.
    wait_until(lambda: "Cannot reach the gpud daemon" in lone_ui.stderr_text(), 10, "the warning on stderr")
    cookie = f"{cookie_name(lone_ui.token)}={lone_ui.token}"
    status, _, answer = lone_ui.request("POST", "/api/v1/models", b"{}", same_origin(lone_ui, cookie))
    assert status == 503 and "Cannot reach the gpud daemon" in json.loads(answer)["error"]["message"]
    events = read_events(lone_ui, cookie, "daemon")
    assert events[-1][1] == {"up": False, "message": events[-1][1]["message"]}  # type: ignore[index]


def run_ui(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpud", "--socket", "/nonexistent.sock", "ui", "--no-open", *args],
                          capture_output=True, text=True, timeout=30)


def test_a_bad_listen_address_is_exit_2_and_a_taken_one_exit_1() -> None:
    done = run_ui("--listen", "nowhere")
    assert done.returncode == 2 and "Invalid --listen 'nowhere'" in done.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_ui("--listen", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert f"gpud ui cannot listen on 127.0.0.1:{port}" in done.stderr and done.stdout == ""


def test_the_cli_imports_aiohttp_only_when_gpud_ui_runs() -> None:
    code = ("import sys; from gpud.cli.parser import parse; ns = parse(['ui', '--no-open']); "
            "print(ns.func.__name__, sorted(m for m in ('aiohttp', 'gpud.ui.server') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.stdout.split() == ["cmd_ui", "[]"], done.stderr
