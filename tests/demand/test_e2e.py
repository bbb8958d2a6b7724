"""SPEC §12 end to end: real daemons, sim replicas, the CLI, the control API and the proxy.

Short timeouts in the daemons' config keep these fast: idle timeouts of a second or two, the scale windows
under a second, a wake timeout of a few seconds where a test needs one.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from helpers import FAST_CONFIG, Daemon, raw_request, wait_until

from gpud.cli.client import Client, model_path

CONFIG = FAST_CONFIG + """
[proxy]
wake_timeout_sec = 20

[scale]
up_after_sec = 0.5
down_after_sec = 1.0
"""
FAST_SIM = ["--startup-s", "0", "--ttft-ms", "5", "--itl-ms", "1"]


class Events:
    """Every event of the daemon's /v1/events stream, collected by a thread from the moment it is made."""

    def __init__(self, daemon: Daemon) -> None:
        self.seen: list[dict[str, Any]] = []
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(Client(daemon.socket),), daemon=True)
        self._thread.start()
        assert self._started.wait(10)

    def _read(self, client: Client) -> None:
        for line in client.stream_lines("/v1/events", timeout=120):
            self._started.set()
            event = json.loads(line)
            self.seen.append(event)
            if event["type"] == "shutdown":
                return

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in list(self.seen) if e["type"] == kind]


def make(make_daemon: Callable[..., Daemon], config: str = CONFIG, gpus: str = "sim:2x80GiB") -> Daemon:
    return make_daemon(config=config, gpus=gpus).start()


def model_body(name: str, vram: str = "30GiB", args: list[str] | None = None, **fields: Any) -> dict[str, Any]:
    return {"name": name, "model": name, "engine": "sim", "vram": vram, "args": args or FAST_SIM, **fields}


async def post(session: aiohttp.ClientSession, daemon: Daemon, model: str, **extra: Any) -> tuple[int, Any, Any]:
    body = {"model": model, "prompt": "hi", "max_tokens": 2, **extra}
    async with session.post(f"{daemon.proxy_url}/v1/completions", json=body) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


def completions(daemon: Daemon, model: str, count: int = 1, **extra: Any) -> list[tuple[int, Any, Any]]:
    async def main() -> list[tuple[int, Any, Any]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            return list(await asyncio.gather(*(post(session, daemon, model, **extra) for _ in range(count))))

    return asyncio.run(main())



def state(daemon: Daemon, name: str) -> str:
    return str(daemon.show(name)["state"])


# ---- CLI --------------------------------------------------------------------------------------------


def test_cli_on_demand_start_load_unload_and_the_show_fields(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make(make_daemon)
    started = time.monotonic()
    out = daemon.cli("model", "start", "od", "--engine", "sim", "--vram", "10GiB", "--on-demand",
                     "--idle-timeout", "10m", "--max-replicas", "3", "--target-inflight", "4", "-o", "json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert time.monotonic() - started < 10  # returns at once: nothing is placed or started
    assert (shown["state"], shown["replicas"], shown["replicas_ready"], shown["replicas_desired"]) == ("idle", [], 0, 1)
    assert (shown["idle_timeout_sec"], shown["on_demand"], shown["max_replicas"], shown["target_inflight"],
            shown["last_request_at"]) == (600.0, True, 3, 4, None)
    assert daemon.client.request("GET", "/v1/gpus")["gpus"][0]["reserved_bytes"] == 0
    assert "idle" in daemon.cli("model", "list").stdout and "Idle timeout:  10m" in daemon.cli("model", "show", "od").stdout

    out = daemon.cli("model", "load", "od", "-o", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["state"] == "running"
    out = daemon.cli("model", "unload", "od", "-o", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["state"] == "idle" and not daemon.replica_pids()
    assert daemon.client.request("GET", "/v1/gpus")["gpus"][0]["reserved_bytes"] == 0

    for action in ("load", "unload"):
        missing = daemon.cli("model", action, "nope")
        assert missing.returncode == 5 and "No model named 'nope'" in missing.stderr


BAD_FLAGS = [
    (["--idle-timeout", "-1"], "negative"),
    (["--idle-timeout", "5x"], "unknown unit"),
    (["--idle-timeout", "99999999h"], "at most"),
    (["--replicas", "2", "--max-replicas", "1"], "cannot be below --replicas"),
    (["--target-inflight", "0"], "--target-inflight 0"),
]


def test_cli_bad_input_is_exit_2_and_changes_nothing(daemon: Daemon) -> None:
    for flags, words in BAD_FLAGS:
        out = daemon.cli("model", "start", "m", "--engine", "sim", "--vram", "1GiB", *flags)
        assert out.returncode == 2 and words in out.stderr and len(out.stderr.strip().splitlines()) == 1, flags
    assert daemon.client.request("GET", "/v1/models") == {"models": []}


def test_load_that_cannot_fit_is_exit_4_and_evicts_nothing(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make(make_daemon, gpus="sim:80GiB")
    daemon.start_model(model_body("pinned", "50GiB"))
    daemon.start_model(model_body("idle-able", "10GiB", idle_timeout="1h"))
    daemon.start_model(model_body("big", "40GiB", on_demand=True))
    events = Events(daemon)
    out = daemon.cli("model", "load", "big")
    assert out.returncode == 4 and "does not fit" in out.stderr
    assert state(daemon, "big") == "idle" and state(daemon, "idle-able") == "running" and not events.of("evicted")


# ---- control API ------------------------------------------------------------------------------------


def test_api_unload_load_and_their_errors(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make(make_daemon)
    daemon.start_model(model_body("m", idle_timeout="1h"))
    status, shown = raw_request(daemon, "POST", model_path("m", "unload"), b"{}")
    assert status == 202
    wait_until(lambda: state(daemon, "m") == "idle", 15, "idle")
    status, shown = raw_request(daemon, "POST", model_path("m", "load"))
    assert status == 202
    assert daemon.wait_idle("m")["state"] == "running"
    for path in (model_path("nope", "load"), model_path("nope", "unload")):
        assert raw_request(daemon, "POST", path, b"{}")[0] == 404
    status, error = raw_request(daemon, "POST", model_path("m", "unload"), b'{"now": true}')
    assert status == 422 and error["error"]["code"] == "invalid"
    assert state(daemon, "m") == "running"
    for bad in ({"idle_timeout": "5x"}, {"idle_timeout": -1}, {"max_replicas": 1, "replicas": 2},
                {"target_inflight": 0}, {"on_demand": "yes"}, {"max_replicas": True}):
        status, error = raw_request(daemon, "POST", "/v1/models", json.dumps(model_body("x", **bad)).encode())
        assert status == 422 and error["error"]["message"].endswith("."), bad
    assert [m["name"] for m in daemon.client.request("GET", "/v1/models")["models"]] == ["m"]
    status, error = raw_request(daemon, "PATCH", model_path("m"), b'{"replicas": 2}')
    assert status == 200  # no max_replicas: a scale as before


# ---- the proxy --------------------------------------------------------------------------------------


def test_requests_wake_an_idle_model_once_and_gets_never_wake_it(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make(make_daemon)
    daemon.start_model(model_body("od", replicas=2, on_demand=True))
    events = Events(daemon)
    listed = json.loads(_get(daemon, "/v1/models"))
    assert [m["id"] for m in listed["data"]] == ["od"]  # idle models are listed
    status = _get_status(daemon, "/v1/anything", {"X-Gpud-Model": "od"})
    assert status == 503 and state(daemon, "od") == "idle"  # a GET is not demand
    assert daemon.show("od")["last_request_at"] is None

    results = completions(daemon, "od", 20)
    assert [s for s, _, _ in results] == [200] * 20
    assert len(events.of("wake")) == 1 and events.of("wake")[0]["why"] == "request"
    shown = daemon.wait_idle("od")
    assert shown["state"] == "running" and [r["restarts"] for r in shown["replicas"]] == [0, 0]
    assert shown["last_request_at"] is not None
    assert len([p for p in daemon.replica_pids()]) >= 2


def test_a_model_that_cannot_be_placed_gets_503_with_the_reason_and_stays_idle(
        make_daemon: Callable[..., Daemon]) -> None:
    daemon = make(make_daemon, gpus="sim:80GiB")
    daemon.start_model(model_body("pinned", "60GiB"))
    daemon.start_model(model_body("od", "40GiB", on_demand=True))
    [(status, body, headers)] = completions(daemon, "od")
    assert status == 503 and int(headers["Retry-After"]) > 0
    assert body["error"]["type"] == "server_error" and "does not fit" in body["error"]["message"]
    assert "GPU0" in body["error"]["message"]
    assert state(daemon, "od") == "idle" and state(daemon, "pinned") == "running"


def test_a_wake_that_outlasts_the_wake_timeout_is_503_and_goes_on(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make(make_daemon, config=CONFIG.replace("wake_timeout_sec = 20", "wake_timeout_sec = 0.5"))
    daemon.start_model(model_body("slow", args=["--startup-s", "3"], on_demand=True))
    [(status, body, headers)] = completions(daemon, "slow")
    assert status == 503 and body["error"]["code"] == "model_wake_timeout" and headers["Retry-After"]
    wait_until(lambda: state(daemon, "slow") == "running", 20, "the wake to go on")
    assert [s for s, _, _ in completions(daemon, "slow")] == [200]


def test_idle_timeout_unloads_after_the_last_request_and_a_stream_keeps_it_loaded(
        make_daemon: Callable[..., Daemon]) -> None:
    daemon = make(make_daemon)
    daemon.start_model(model_body("m", idle_timeout="1.5s", args=["--startup-s", "0", "--itl-ms", "100"]))
    events = Events(daemon)

    async def stream() -> float:
        body = {"model": "m", "prompt": "hi", "max_tokens": 30, "stream": True}  # ~3 s of tokens
        async with aiohttp.ClientSession() as session, \
                session.post(f"{daemon.proxy_url}/v1/completions", json=body) as resp:
            async for _ in resp.content:
                pass
            return time.monotonic()

    ended = asyncio.run(stream())
    assert state(daemon, "m") == "running"  # 3 s of streaming, longer than the idle timeout
    wait_until(lambda: state(daemon, "m") == "idle", 10, "idle")
    assert time.monotonic() - ended >= 1.4
    assert [e["why"] for e in events.of("idle")] == ["timeout"]
    assert not daemon.replica_pids()
    assert [s for s, _, _ in completions(daemon, "m")] == [200]  # and wakes on the next request


def test_eviction_follows_least_recent_use(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make(make_daemon, gpus="sim:80GiB")  # 79.5 GiB available: two 30 GiB models at once
    for name in ("a", "b", "c"):
        daemon.start_model(model_body(name, "30GiB", on_demand=True, idle_timeout="1h"))
    events = Events(daemon)
    for name in ("a", "b", "a", "c"):  # b is now the least recently used
        assert [s for s, _, _ in completions(daemon, name)] == [200]
    assert [(e["name"], e["by"]) for e in events.of("evicted")] == [("b", "c")]
    assert (state(daemon, "a"), state(daemon, "b"), state(daemon, "c")) == ("running", "idle", "running")
    assert [s for s, _, _ in completions(daemon, "b")] == [200]  # a is the least recently used now
    assert [(e["name"], e["by"]) for e in events.of("evicted")] == [("b", "c"), ("a", "b")]


def test_load_based_scaling_up_under_load_and_down_after(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make(make_daemon)
    daemon.start_model(model_body("chat", "10GiB", max_replicas=2, target_inflight=2,
                                  args=["--startup-s", "0", "--ttft-ms", "5", "--itl-ms", "50"]))
    events = Events(daemon)
    stop = threading.Event()

    async def load() -> None:
        async with aiohttp.ClientSession() as session:
            async def client() -> None:
                while not stop.is_set():
                    await post(session, daemon, "chat", max_tokens=10)  # 0.5 s each: 4 clients keep 2+ in flight

            await asyncio.gather(*(client() for _ in range(4)))

    thread = threading.Thread(target=lambda: asyncio.run(load()))
    thread.start()
    try:
        wait_until(lambda: daemon.show("chat")["replicas_ready"] == 2, 30, "a second replica")
    finally:
        stop.set()
        thread.join(30)
    wait_until(lambda: len(daemon.show("chat")["replicas"]) == 1, 30, "back to one replica")
    scaled = [(e["from"], e["to"]) for e in events.of("scaled")]
    assert scaled == [(1, 2), (2, 1)]
    assert all(e["why"] for e in events.of("scaled"))
    shown = daemon.show("chat")
    assert [r["index"] for r in shown["replicas"]] == [0] and shown["replicas_desired"] == 1


# ---- restart ----------------------------------------------------------------------------------------


def test_a_restart_keeps_idle_models_idle_and_wakes_nothing(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make(make_daemon)
    daemon.start_model(model_body("on-demand", on_demand=True))
    daemon.start_model(model_body("unloaded", idle_timeout="1h"))
    daemon.start_model(model_body("loaded", idle_timeout="1h"))
    daemon.client.request("POST", model_path("unloaded", "unload"), {})
    wait_until(lambda: state(daemon, "unloaded") == "idle", 15, "idle")
    last = daemon.show("unloaded")["last_request_at"]
    daemon.stop()
    daemon.start()
    wait_until(lambda: state(daemon, "loaded") == "running", 15, "the loaded model back")
    assert (state(daemon, "on-demand"), state(daemon, "unloaded")) == ("idle", "idle")
    assert daemon.show("unloaded")["last_request_at"] == last
    reserved = {r["model"] for g in daemon.client.request("GET", "/v1/gpus")["gpus"] for r in g["replicas"]}
    assert reserved == {"loaded"}
    assert [s for s, _, _ in completions(daemon, "unloaded")] == [200]


def _get(daemon: Daemon, path: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(daemon.proxy_url + path, timeout=10) as resp:
        return bytes(resp.read())


def _get_status(daemon: Daemon, path: str, headers: dict[str, str]) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(daemon.proxy_url + path, headers=headers),
                                    timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
