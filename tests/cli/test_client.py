"""The control-API client and the CLI's waiting commands against a fake daemon on a real Unix socket.

The fake is a threaded stdlib HTTP server bound to AF_UNIX: scripted JSON answers and chunked streams
(NDJSON events that stay open until the client leaves, like the real daemon's).
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import socketserver
import tempfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from gpud.cli import main as cli
from gpud.cli.client import Client, StreamTimeout, model_path
from gpud.errors import Conflict, DaemonUnreachable, DoesNotFit, GpudError, InvalidInput, NotFound


class Json:
    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body


class Stream:
    """A chunked answer: `lines` then, unless `end`, hold the stream open until the client goes away."""

    def __init__(self, lines: list[str], *, end: bool = False, content_type: str = "application/x-ndjson") -> None:
        self.lines, self.end, self.content_type = lines, end, content_type


Route = Callable[[dict[str, Any]], "Json | Stream"]


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    fake: FakeDaemon


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # AF_UNIX peers have no address to log
        pass

    def _handle(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        request = {
            "method": self.command,
            "path": url.path,
            "query": {k: v[0] for k, v in parse_qs(url.query).items()},
            "body": json.loads(raw) if raw else None,
        }
        fake = self.server.fake
        with fake.lock:
            fake.requests.append(request)
        route = fake.routes.get((self.command, url.path))
        answer = route(request) if route else Json(404, {"error": {"code": "not_found", "message": "No route."}})
        if isinstance(answer, Json):
            data = json.dumps(answer.body).encode()
            self.send_response(answer.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for line in answer.lines:
                chunk = (line + "\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            if answer.end:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                return
            # Like the daemon's event stream: never ends by itself; returns when the client closes.
            self.connection.settimeout(30)
            self.rfile.read(1)
        except OSError:
            pass
        self.close_connection = True

    do_GET = do_POST = do_PATCH = do_DELETE = _handle


class FakeDaemon:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.routes: dict[tuple[str, str], Route] = {}
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._server = _Server(socket_path, _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.start()

    def route(self, method: str, path: str, answer: Json | Stream | Route) -> None:
        self.routes[(method, path)] = answer if callable(answer) else (lambda _req, a=answer: a)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 107-byte limit of a Unix socket path.
    path = Path(tempfile.mkdtemp(prefix="gpud-t-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake(short_dir: Path) -> Iterator[FakeDaemon]:
    daemon = FakeDaemon(str(short_dir / "gpud.sock"))
    yield daemon
    daemon.close()


def run(fake: FakeDaemon, *argv: str) -> int:
    return cli.main(["--socket", fake.socket_path, *argv])


def replica(index: int, state: str, **extra: Any) -> dict[str, Any]:
    base = {
        "index": index, "state": state, "pid": 1000 + index if state != "pending" else None, "gpus": [index % 2],
        "vram_bytes": 20 * 2**30, "port": 41000 + index, "restarts": 0, "inflight": 0, "last_exit": None,
    }
    return {**base, **extra}


def show(name: str, state: str, replicas: list[dict[str, Any]], *, busy: bool) -> dict[str, Any]:
    return {
        "name": name, "model": name, "engine": "sim", "state": state, "replicas_desired": len(replicas),
        "replicas_ready": sum(r["state"] == "ready" for r in replicas), "endpoint": "http://127.0.0.1:8000/v1",
        "env": {}, "venv": None, "replicas": replicas, "busy": busy,
    }


def model_event(obj: dict[str, Any]) -> str:
    return json.dumps({"type": "model", "name": obj["name"], "model": obj})


class TtyStringIO(io.StringIO):
    def isatty(self) -> bool:
        return True


# ---- Client ------------------------------------------------------------------------------------------


def test_request_sends_json_and_decodes_the_answer(fake: FakeDaemon) -> None:
    fake.route("POST", "/v1/plan", Json(200, {"fits": True, "replicas": [], "reason": None}))
    answer = Client(fake.socket_path).request("POST", "/v1/plan", {"replicas": 2}, query={"x": "1", "skip": None})
    assert answer == {"fits": True, "replicas": [], "reason": None}
    assert fake.requests == [{"method": "POST", "path": "/v1/plan", "query": {"x": "1"}, "body": {"replicas": 2}}]


@pytest.mark.parametrize(
    ("status", "code", "cls", "exit_code"),
    [
        (422, "invalid", InvalidInput, 2),
        (404, "not_found", NotFound, 5),
        (409, "conflict", Conflict, 1),
        (409, "does_not_fit", DoesNotFit, 4),
        (503, "unavailable", GpudError, 1),
    ],
)
def test_http_errors_become_gpud_errors(fake: FakeDaemon, status: int, code: str, cls: type, exit_code: int) -> None:
    fake.route("GET", "/v1/status", Json(status, {"error": {"code": code, "message": "It went wrong.", "extra": 7}}))
    with pytest.raises(cls) as info:
        Client(fake.socket_path).request("GET", "/v1/status")
    assert info.value.message == "It went wrong."
    assert info.value.details == {"extra": 7}
    assert info.value.exit_code == exit_code


def test_error_without_json_body_is_one_sentence(fake: FakeDaemon) -> None:
    def broken(_req: dict[str, Any]) -> Json:
        return Json(500, None)

    fake.route("GET", "/v1/status", broken)
    with pytest.raises(GpudError, match=r"^The daemon answered HTTP 500 without an error body\.$"):
        Client(fake.socket_path).request("GET", "/v1/status")


def test_names_with_slash_are_url_encoded(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    name = "Qwen/Qwen2.5-7B-Instruct"
    assert model_path(name, "logs") == "/v1/models/Qwen%2FQwen2.5-7B-Instruct/logs"
    fake.route("GET", "/v1/models/Qwen%2FQwen2.5-7B-Instruct", Json(200, show(name, "running", [], busy=False)))
    assert run(fake, "model", "show", name, "-o", "json") == 0
    assert json.loads(capsys.readouterr().out)["name"] == name
    assert fake.requests[0]["path"] == "/v1/models/Qwen%2FQwen2.5-7B-Instruct"


def test_stream_lines_yields_ndjson_lines_and_ends_with_the_response(fake: FakeDaemon) -> None:
    fake.route("GET", "/v1/events", Stream(['{"a": 1}', '{"b": "é"}'], end=True))
    lines = list(Client(fake.socket_path).stream_lines("/v1/events", {"model": "m"}))
    assert lines == ['{"a": 1}', '{"b": "é"}']
    assert fake.requests[0]["query"] == {"model": "m"}


def test_stream_lines_times_out_on_a_silent_stream(fake: FakeDaemon) -> None:
    fake.route("GET", "/v1/events", Stream(["first"]))
    stream = Client(fake.socket_path).stream_lines("/v1/events", timeout=0.3)
    assert next(stream) == "first"
    with pytest.raises(StreamTimeout):
        next(stream)


def test_stream_errors_are_raised_before_any_line(fake: FakeDaemon) -> None:
    with pytest.raises(NotFound, match="No route"):
        list(Client(fake.socket_path).stream_lines("/v1/models/x/logs"))


def test_missing_socket_is_unreachable(short_dir: Path) -> None:
    path = str(short_dir / "none.sock")
    with pytest.raises(DaemonUnreachable, match=r"the socket does not exist \(is `gpud daemon` running\?\)\.$"):
        Client(path).request("GET", "/v1/status")


def test_socket_nobody_listens_on_is_unreachable(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(short_dir / "dead.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)  # bound, never listening: what a crashed daemon leaves behind
    sock.close()
    assert cli.main(["--socket", path, "status"]) == 3
    err = capsys.readouterr().err
    assert err == f"gpud: Cannot reach the gpud daemon at {path}: nothing is listening on the socket " \
                  "(is `gpud daemon` running?).\n"


def test_gpud_socket_env_is_the_default(
    fake: FakeDaemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.route("GET", "/v1/models", Json(200, {"models": []}))
    monkeypatch.setenv("GPUD_SOCKET", fake.socket_path)
    assert cli.main(["model", "list"]) == 0
    assert capsys.readouterr().out == "No models are running.\n"


# ---- the CLI's waiting commands ----------------------------------------------------------------------


def test_start_waits_until_not_busy_and_shows_progress(
    fake: FakeDaemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pending = show("demo", "starting", [replica(0, "pending"), replica(1, "pending")], busy=True)
    starting = show("demo", "starting", [replica(0, "starting"), replica(1, "pending")], busy=True)
    half = show("demo", "starting", [replica(0, "ready"), replica(1, "starting")], busy=True)
    done = show("demo", "running", [replica(0, "ready"), replica(1, "ready")], busy=False)
    fake.route("POST", "/v1/models", Json(201, pending))
    fake.route("GET", "/v1/events", Stream([
        model_event(pending),
        json.dumps({"type": "progress", "name": "demo", "phase": "venv", "line": "Collecting numpy"}),
        json.dumps({"type": "something-new", "name": "demo"}),
        model_event(show("other", "running", [], busy=False)),  # another model: ignored
        model_event(starting),
        model_event(half),
        model_event(done),
    ]))
    stderr = TtyStringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    assert run(fake, "model", "start", "demo", "--engine", "sim", "--replicas", "2", "-o", "json") == 0
    assert json.loads(capsys.readouterr().out) == done
    assert fake.requests[0]["body"] == {"name": "demo", "model": "demo", "engine": "sim", "replicas": 2}
    assert fake.requests[1]["path"] == "/v1/events" and fake.requests[1]["query"] == {"model": "demo"}
    assert stderr.getvalue().splitlines() == [
        "replica 0: pending (GPU 0)",
        "replica 1: pending (GPU 1)",
        "venv: Collecting numpy",
        "replica 0: pending → starting (GPU 0, port 41000)",
        "replica 0: starting → ready (GPU 0, port 41000)",
        "replica 1: pending → starting (GPU 1, port 41001)",
        "replica 1: starting → ready (GPU 1, port 41001)",
    ]


def test_start_without_a_tty_prints_only_the_table(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    done = show("demo", "running", [replica(0, "ready")], busy=False)
    fake.route("POST", "/v1/models", Json(201, show("demo", "starting", [replica(0, "pending")], busy=True)))
    fake.route("GET", "/v1/events", Stream([model_event(done)]))
    assert run(fake, "model", "start", "demo") == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("Name:") and "running" in out and "INDEX  STATE" in out


def test_start_with_a_failed_replica_exits_1_and_still_prints_json(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = replica(1, "failed", pid=None, restarts=6, last_exit={"code": 1, "signal": None},
                     message="Start limit reached: 6 failed starts within 300 s")
    final = show("demo", "degraded", [replica(0, "ready"), failed], busy=False)
    fake.route("POST", "/v1/models", Json(201, show("demo", "starting", [], busy=True)))
    fake.route("GET", "/v1/events", Stream([model_event(final)]))
    assert run(fake, "model", "start", "demo", "--replicas", "2", "-o", "json") == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == final
    assert err == ("gpud: Model 'demo' replica 1 failed: Start limit reached: 6 failed starts within 300 s "
                   "(last exit: exited with code 1).\n")


def test_start_that_does_not_fit_prints_the_plan_with_json(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    plan = {"fits": False, "replicas": [], "reason": "3 replicas of 60 GiB do not fit: GPU0 has 79.5 GiB available."}
    fake.route("POST", "/v1/models", Json(409, {"error": {"code": "does_not_fit", "message": plan["reason"], "plan": plan}}))
    assert run(fake, "model", "start", "demo", "--replicas", "3", "--vram", "60GiB", "-o", "json") == 4
    out, err = capsys.readouterr()
    assert json.loads(out) == plan
    assert err == f"gpud: {plan['reason']}\n"
    assert len(fake.requests) == 1  # nothing to wait for


def test_not_found_exits_5(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    error = Json(404, {"error": {"code": "not_found", "message": "Model 'ghost' does not exist."}})
    fake.route("PATCH", "/v1/models/ghost", error)
    assert run(fake, "model", "scale", "ghost", "--replicas", "2") == 5
    assert capsys.readouterr().err == "gpud: Model 'ghost' does not exist.\n"
    assert fake.requests[0]["body"] == {"replicas": 2}


def test_timeout_while_waiting_says_the_operation_goes_on(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    busy = show("demo", "starting", [replica(0, "starting")], busy=True)
    fake.route("POST", "/v1/models/demo/restart", Json(202, busy))
    fake.route("GET", "/v1/events", Stream([model_event(busy)]))
    assert run(fake, "model", "restart", "demo", "--rolling", "--timeout", "0.3") == 1
    assert fake.requests[0]["body"] == {"rolling": True}
    assert capsys.readouterr().err == (
        "gpud: Timed out after 0.3 s waiting for model 'demo'; the operation goes on in the background "
        "(check with `gpud model show demo`).\n"
    )


def test_stop_waits_until_removed(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    stopping = show("demo", "stopping", [replica(0, "stopping")], busy=True)
    fake.route("DELETE", "/v1/models/demo", Json(202, stopping))
    fake.route("GET", "/v1/events", Stream([
        model_event(stopping),
        model_event({**stopping, "busy": False}),  # not busy yet still there: keep waiting for removal
        json.dumps({"type": "removed", "name": "demo"}),
    ]))
    assert run(fake, "model", "stop", "demo") == 0
    assert capsys.readouterr().out == "Stopped model 'demo'.\n"


def test_no_wait_returns_the_accepted_state(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    busy = show("demo", "starting", [replica(0, "ready"), replica(1, "pending")], busy=True)
    fake.route("PATCH", "/v1/models/demo", Json(200, busy))
    assert run(fake, "model", "scale", "demo", "--replicas", "2", "--no-wait", "-o", "json") == 0
    assert json.loads(capsys.readouterr().out) == busy
    assert [r["path"] for r in fake.requests] == ["/v1/models/demo"]


def test_event_stream_that_ends_early_is_an_error(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    busy = show("demo", "starting", [], busy=True)
    fake.route("POST", "/v1/models", Json(201, busy))
    fake.route("GET", "/v1/events", Stream([model_event(busy)], end=True))
    assert run(fake, "model", "start", "demo") == 1
    assert "ended the event stream before model 'demo' was done" in capsys.readouterr().err


def test_model_removed_while_starting_is_an_error(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    fake.route("POST", "/v1/models", Json(201, show("demo", "starting", [], busy=True)))
    fake.route("GET", "/v1/events", Stream([json.dumps({"type": "removed", "name": "demo"})]))
    assert run(fake, "model", "start", "demo") == 1
    assert capsys.readouterr().err == "gpud: Model 'demo' was removed before the operation finished.\n"


def test_logs_prints_lines_and_passes_the_query(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    fake.route("GET", "/v1/models/demo/logs", Stream(["INFO started", "", "INFO ready"], end=True,
                                                      content_type="text/plain"))
    assert run(fake, "model", "logs", "demo", "--replica", "1", "-n", "50") == 0
    assert capsys.readouterr().out == "INFO started\n\nINFO ready\n"
    assert fake.requests[0]["query"] == {"replica": "1", "lines": "50", "follow": "0"}


def test_read_commands_render_tables(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    fake.route("GET", "/v1/status", Json(200, {
        "version": "0.1.0", "uptime_sec": 3725, "socket": fake.socket_path, "proxy": "127.0.0.1:8000",
        "gpus_spec": "sim:2x80GiB", "models": 1, "replicas": 3, "ready": 2,
    }))
    fake.route("GET", "/v1/venvs", Json(200, {"venvs": []}))
    fake.route("POST", "/v1/venvs/prune", Json(200, {"removed": ["/var/lib/gpud/venvs/abc"]}))
    assert run(fake, "status") == 0
    assert "Uptime:   1h 2m" in capsys.readouterr().out
    assert run(fake, "venv", "list") == 0
    assert capsys.readouterr().out == "No virtualenvs.\n"
    assert run(fake, "venv", "prune", "-o", "json") == 0
    assert json.loads(capsys.readouterr().out) == {"removed": ["/var/lib/gpud/venvs/abc"]}


def test_plan_through_the_daemon(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    plan = {"fits": False, "replicas": [], "reason": "1 replica of 90 GiB does not fit: GPU0 has 79.5 GiB available."}
    fake.route("POST", "/v1/plan", Json(200, plan))
    assert run(fake, "plan", "--vram", "90GiB", "--gpu-idx", "0") == 4
    out, err = capsys.readouterr()
    assert out == "" and err == f"gpud: {plan['reason']}\n"
    assert fake.requests[0]["body"] == {"replicas": 1, "vram": "90GiB", "gpu_idx": [0]}


def test_is_busy_falls_back_to_replica_states_without_the_busy_key() -> None:
    from gpud.cli.client import is_busy

    assert is_busy(show("m", "running", [replica(0, "ready")], busy=True)) is True
    legacy = show("m", "starting", [replica(0, "ready"), replica(1, "starting")], busy=False)
    del legacy["busy"]
    assert is_busy(legacy) is True
    legacy["replicas"][1]["state"] = "failed"
    assert is_busy(legacy) is False
    legacy["replicas"] = [replica(0, "ready")]
    assert is_busy(legacy) is False
