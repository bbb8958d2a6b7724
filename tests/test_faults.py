"""Faults through a real daemon (issue #6): replicas killed under load, crash loops, frozen replicas, the daemon
itself SIGKILLed with stubborn grandchildren, many concurrent streams, and what listens where."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import aiohttp
import psutil
from helpers import FAST_CONFIG, Daemon, wait_until

GiB = 2**30


def completion(daemon: Daemon, model: str = "m") -> tuple[int, str | None]:
    """A small non-streamed completion through the proxy: (status, the replica that answered)."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    try:
        body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 3}).encode()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.headers.get("X-Gpud-Replica")
    finally:
        conn.close()


class Stream:
    """A streamed completion over a raw socket, decoding the chunked framing by hand: http.client hides a
    missing last chunk (a truncated stream reads like a complete one), and that difference is the point."""

    def __init__(self, daemon: Daemon, max_tokens: int, timeout: float = 5) -> None:
        body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": max_tokens, "stream": True}).encode()
        self.sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=timeout)
        self.sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.raw = b""
        while b"\r\n\r\n" not in self.raw:
            self.raw += self._recv()
        head, _, self.raw = self.raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        self.replica = int(re.search(rb"(?im)^x-gpud-replica: *(\d+)", head).group(1))  # type: ignore[union-attr]
        self.body = b""
        self.terminated = False  # the closing zero-size chunk arrived
        self.last_byte = time.monotonic()

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)  # the socket timeout turns a hang into an error
        if data:
            self.last_byte = time.monotonic()
        return data

    def _decode(self) -> None:
        while True:
            size_line, sep, rest = self.raw.partition(b"\r\n")
            if not sep:
                return
            size = int(size_line.split(b";")[0], 16)
            if len(rest) < size + 2:
                return
            self.body += rest[:size]
            self.raw = rest[size + 2 :]
            if size == 0:
                self.terminated = True
                return

    def first_event(self) -> bytes:
        while b"\n\n" not in self.body:
            self._decode()
            if b"\n\n" not in self.body:
                self.raw += self._recv()
        return self.body.split(b"\n\n", 1)[0]

    def finish(self) -> str:
        """Read to the end: "complete", "error event" (an error event, then the connection cut) or what else."""
        try:
            while not self.terminated:
                self._decode()
                if self.terminated or not (data := self._recv()):
                    break
                self.raw += data
        finally:
            self.sock.close()
        if self.terminated:
            return "complete" if self.body.endswith(b"data: [DONE]\n\n") else "ended early"
        if b'"code": "upstream_error"' in self.body.rsplit(b"\n\n", 2)[-2]:
            return "error event"
        return "cut without an error event"


def sim_wrapper(tmp: Path, prelude: str) -> str:
    """A command-engine template running the sim server after `prelude` (Python, with os/sys imported)."""
    wrapper = tmp / "wrap.py"
    wrapper.write_text(
        "import os, sys, runpy, signal, subprocess, time\n"
        + prelude
        + "\nsys.argv = ['simserver', *sys.argv[1:]]\nrunpy.run_module('gpud.sim.server', run_name='__main__')\n"
    )
    return f"{sys.executable} {wrapper} --host {{host}} --port {{port}} --startup-s 0.05"


# -- replicas dying under load --------------------------------------------------------------------------------


def test_replicas_killed_again_and_again_under_load_cost_no_unstarted_request(daemon: Daemon) -> None:
    daemon.start_model({"model": "m", "engine": "sim", "vram": "1GiB", "replicas": 3,
                        "args": ["--startup-s", "0.05"]})
    stop = threading.Event()
    statuses: Counter[int] = Counter()
    streams: list[tuple[str, float]] = []  # (outcome, seconds from the last byte to the end)
    streaming_on: dict[int, int] = {}  # stream worker -> replica index it is reading from
    problems: list[str] = []

    def requests_worker() -> None:
        while not stop.is_set():
            try:
                statuses[completion(daemon)[0]] += 1
            except Exception as exc:  # noqa: BLE001 - any failure is a finding, reported below
                problems.append(f"request: {exc!r}")

    def stream_worker(me: int) -> None:
        while not stop.is_set():
            try:
                stream = Stream(daemon, 400)
            except Exception as exc:  # noqa: BLE001 - any failure is a finding, reported below
                problems.append(f"stream: {exc!r}")
                continue
            streaming_on[me] = stream.replica
            try:
                outcome = stream.finish()
            except TimeoutError:
                outcome = "hung"
            finally:
                streaming_on.pop(me, None)
            streams.append((outcome, time.monotonic() - stream.last_byte))

    workers = [threading.Thread(target=requests_worker) for _ in range(6)]
    workers += [threading.Thread(target=stream_worker, args=(i,)) for i in range(2)]
    for worker in workers:
        worker.start()
    try:
        for kill in range(6):
            # Prefer a replica with a stream in flight, so that cut streams are part of every run.
            wait_until(lambda: streaming_on, 10, "a stream in flight")
            shown = daemon.show("m")["replicas"]
            busy = set(streaming_on.values())
            victim = next((r for r in shown if r["index"] in busy and r["state"] == "ready"), None) or next(
                r for r in shown if r["state"] == "ready")
            os.kill(victim["pid"], signal.SIGKILL)
            wait_until(lambda v=victim: (r := daemon.show("m")["replicas"][v["index"]])["state"] == "ready"
                       and r["pid"] != v["pid"], 15, f"replica {victim['index']} to come back (kill {kill})")
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert not problems, problems[:5]
    assert statuses[200] > 50 and set(statuses) == {200}, statuses  # retried on another replica, all of them
    outcomes = Counter(outcome for outcome, _ in streams)
    assert set(outcomes) <= {"complete", "error event"}, outcomes  # never a clean-looking early end, no hang
    assert outcomes["error event"] >= 1, outcomes
    assert max(seconds for _, seconds in streams) < 2.0  # a cut stream ends at once, not after a timeout
    assert sum(r["restarts"] for r in daemon.show("m")["replicas"]) == 6


# -- crash loops -------------------------------------------------------------------------------------------


def test_a_crash_looping_replica_fails_alone_and_the_model_keeps_serving(make_daemon, tmp_path: Path) -> None:
    config = "[supervisor]\nrestart_sec = 0.02\nrestart_max_delay_sec = 0.1\nstart_limit_burst = 2\n"
    daemon = make_daemon(config=config).start()
    template = sim_wrapper(tmp_path, "if os.environ['GPUD_REPLICA'] == '1':\n    sys.exit(5)\n")
    daemon.start_model({"model": "m", "engine": "command", "command": template, "vram": "10GiB",
                        "replicas": 3}, settle=False)
    wait_until(lambda: [r["state"] for r in daemon.show("m")["replicas"]].count("ready") == 2, 20,
               "replicas 0 and 2 to be ready")
    answered: Counter[str | None] = Counter()
    while daemon.show("m")["replicas"][1]["state"] != "failed":  # requests while replica 1 crash-loops
        status, replica = completion(daemon)
        assert status == 200
        answered[replica] += 1
    for _ in range(6):
        status, replica = completion(daemon)
        assert status == 200
        answered[replica] += 1
    assert set(answered) == {"0", "2"}
    shown = daemon.show("m")
    assert shown["state"] == "degraded" and shown["replicas_ready"] == 2
    failed = shown["replicas"][1]
    assert failed["restarts"] == 2 and failed["last_exit"] == {"code": 5, "signal": None}
    assert "gave up" in failed["message"]
    # Replicas 0 and 2 share GPU0; replica 1's GPU1 reservation went back to the ledger.
    assert [g["reserved_bytes"] for g in daemon.client.request("GET", "/v1/gpus")["gpus"]] == [20 * GiB, 0]


# -- frozen replicas -----------------------------------------------------------------------------------------


def test_a_frozen_replica_gives_its_requests_an_error_after_the_idle_timeout_then_is_restarted(make_daemon) -> None:
    config = FAST_CONFIG.replace("health_interval_sec = 0.3", "health_interval_sec = 0.5")
    daemon = make_daemon(config=config + "[proxy]\nidle_timeout_sec = 0.3\n").start()
    shown = daemon.start_model({"model": "m", "engine": "sim", "vram": "1GiB", "args": ["--startup-s", "0.05"]})
    frozen = shown["replicas"][0]["pid"]
    stream = Stream(daemon, 100_000)
    assert stream.first_event().startswith(b"data: {")
    os.kill(frozen, signal.SIGSTOP)  # accepts connections (the kernel does), answers nothing
    try:
        started = time.monotonic()
        status, _ = completion(daemon)
        assert status == 504 and 0.25 <= time.monotonic() - started < 3
        # The stream in flight ends too, with an error event and a cut connection, not a hang.
        assert stream.finish() == "error event"
        replica = wait_until(lambda: (r := daemon.show("m")["replicas"][0])["restarts"] == 1
                             and r["state"] == "ready" and r, 20, "the frozen replica to be replaced")
        assert replica["pid"] != frozen
        assert completion(daemon)[0] == 200
    finally:
        stream.sock.close()
        try:
            os.kill(frozen, signal.SIGCONT)
        except ProcessLookupError:
            pass


# -- the daemon dying --------------------------------------------------------------------------------------


def test_a_sigkilled_daemon_leaves_no_stubborn_grandchild_within_5_s(make_daemon, tmp_path: Path) -> None:
    # stop_timeout_sec is the default 30 s: what matters here is what happens once the daemon is gone.
    daemon = make_daemon(config=FAST_CONFIG.replace("stop_timeout_sec = 5", "stop_timeout_sec = 30")).start()
    prelude = (  # each replica leaves a grandchild in its own session that ignores SIGTERM
        "child = 'import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'\n"
        "subprocess.Popen([sys.executable, '-c', child], start_new_session=True)\n"
    )
    daemon.start_model({"model": "m", "engine": "command", "command": sim_wrapper(tmp_path, prelude),
                        "vram": "1GiB", "replicas": 2})
    try:
        for life in ("first", "restored"):
            wait_until(lambda: len(daemon.replica_pids()) >= 6, 10, "shims, engines and grandchildren")
            daemon.stop(signal.SIGKILL)
            wait_until(lambda: not daemon.replica_pids(), 5, f"every process of the {life} life to be gone "
                       "(the shim must cut its SIGTERM grace short once the daemon is gone)")
            if life == "first":
                daemon.start()
                assert daemon.wait_idle("m")["replicas_ready"] == 2
    finally:
        for pid in daemon.replica_pids():  # on failure: do not leave stubborn processes to the next tests
            os.kill(pid, signal.SIGKILL)


# -- load ----------------------------------------------------------------------------------------------------


def test_200_concurrent_streams_complete_and_the_control_api_stays_responsive(daemon: Daemon) -> None:
    daemon.start_model({"model": "m", "engine": "sim", "vram": "1GiB", "replicas": 3,
                        "args": ["--startup-s", "0.05", "--itl-ms", "10"]})
    latencies: list[float] = []
    done = threading.Event()

    def control_api() -> None:
        while not done.is_set():
            started = time.monotonic()
            daemon.client.request("GET", "/v1/models")
            latencies.append(time.monotonic() - started)

    async def streams() -> list[int]:
        body = {"model": "m", "prompt": "hi", "max_tokens": 40, "stream": True}
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as s:

            async def one() -> int:
                async with s.post(f"{daemon.proxy_url}/v1/completions", json=body) as r:
                    events = [line async for line in r.content if line.startswith(b"data: ")]
                return len(events) if r.status == 200 and events[-1] == b"data: [DONE]\n" else -1

            return await asyncio.gather(*(one() for _ in range(200)))

    poller = threading.Thread(target=control_api)
    poller.start()
    try:
        counts = asyncio.run(streams())
    finally:
        done.set()
        poller.join(30)
    assert counts == [41] * 200
    assert latencies and max(latencies) < 2.0, max(latencies)
    # The proxy counts a request out after its last byte went to the client, and the daemon copies the counts
    # every SYNC_SEC: the count reaches 0 shortly after the streams end (a leak would keep it above).
    wait_until(lambda: sum(r["inflight"] for r in daemon.show("m")["replicas"]) == 0, 5, "no request in flight")


# -- where things listen -------------------------------------------------------------------------------------


def test_replicas_and_the_proxy_listen_on_loopback_only(daemon: Daemon) -> None:
    shown = daemon.start_model({"model": "m", "engine": "sim", "vram": "1GiB", "replicas": 2})
    listening: dict[int, list[str]] = {}
    for pid in [r["pid"] for r in shown["replicas"]] + [daemon.proc.pid]:  # type: ignore[union-attr]
        for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            listening[proc.pid] = [c.laddr.ip for c in proc.net_connections(kind="inet")
                                   if c.status == psutil.CONN_LISTEN]
    assert all(listening[r["pid"]] for r in shown["replicas"])  # each replica does listen
    # The proxy port listens in the daemon's proxy worker (a child of the daemon, not of a replica).
    workers = psutil.Process(daemon.proc.pid).children()  # type: ignore[union-attr]
    assert any(c.laddr.port == daemon.port and c.status == psutil.CONN_LISTEN
               for w in workers for c in w.net_connections(kind="inet"))
    assert {ip for ips in listening.values() for ip in ips} == {"127.0.0.1"}, listening
