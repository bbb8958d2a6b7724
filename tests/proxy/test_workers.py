"""Proxy workers (SPEC §14) through a real daemon: least connections counted across workers, a dead worker
started again while the other serves, /metrics summed over workers, no worker outliving the daemon."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator

import psutil
import pytest
from helpers import FAST_CONFIG, Daemon, wait_until

from gpud.config import load_settings
from gpud.errors import InvalidInput

TWO_WORKERS = FAST_CONFIG + "[proxy]\nworkers = 2\n"
STREAM = {"model": "m", "prompt": "hi", "max_tokens": 100_000, "stream": True}


def workers_of(daemon: Daemon) -> list[psutil.Process]:
    assert daemon.proc is not None
    return [p for p in psutil.Process(daemon.proc.pid).children() if "gpud.proxy.worker" in " ".join(p.cmdline())]


def worker_serving(daemon: Daemon, sock: socket.socket) -> int:
    """The pid of the worker holding the other end of a client connection."""
    port = sock.getsockname()[1]
    for worker in workers_of(daemon):
        if any(c.raddr and c.raddr.port == port for c in worker.net_connections(kind="inet")):
            return worker.pid
    raise AssertionError(f"no worker holds the connection from port {port}")


def open_stream(daemon: Daemon) -> tuple[socket.socket, int]:
    """A streamed completion on its own connection, read up to its first event: (socket, replica)."""
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    body = json.dumps(STREAM).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    seen = b""
    while b"data: " not in seen:
        seen += sock.recv(65536)
    match = re.search(rb"(?i)x-gpud-replica: (\d+)", seen)
    assert match, seen[:300]
    return sock, int(match.group(1))


def completion(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/completions", json.dumps({"model": "m", "prompt": "x", "max_tokens": 2}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def scrape(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


@pytest.fixture
def two_workers(make_daemon) -> Iterator[Daemon]:  # type: ignore[no-untyped-def]
    daemon = make_daemon(config=TWO_WORKERS).start()
    daemon.start_model({"model": "m", "engine": "sim", "replicas": 3, "vram": "1GiB",
                        "args": ["--startup-s", "0", "--itl-ms", "50"]})
    wait_until(lambda: len(workers_of(daemon)) == 2, 10, "two workers")
    yield daemon


def test_least_connections_counts_every_workers_requests(two_workers: Daemon) -> None:
    streams = []
    try:
        for _ in range(6):
            streams.append(open_stream(two_workers))
        # Opened one after another, each stream goes to the least loaded replica as every worker counts it:
        # 2/2/2, although the connections landed on both workers.
        assert Counter(replica for _, replica in streams) == {0: 2, 1: 2, 2: 2}
        assert len({worker_serving(two_workers, sock) for sock, _ in streams}) == 2
        shown = two_workers.show("m")
        assert sorted(r["inflight"] for r in shown["replicas"]) == [2, 2, 2]  # the daemon sees them too
    finally:
        for sock, _ in streams:
            sock.close()
    wait_until(lambda: all(r["inflight"] == 0 for r in two_workers.show("m")["replicas"]), 10, "streams to end")


def exited(proc: psutil.Process) -> bool:
    """The process has ended (a zombie not yet reaped by the daemon counts: its sockets are closed)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_killed_worker_is_started_again_while_the_other_serves(two_workers: Daemon) -> None:
    victim, survivor = workers_of(two_workers)
    victim.send_signal(signal.SIGKILL)
    # Once the killed process has exited (its sockets closed with it), the kernel offers new connections only
    # to the surviving worker's socket: they are served meanwhile. (A connection made in the instant before
    # the exit would sit in the dead socket's queue and be reset with it.)
    wait_until(lambda: exited(victim), 10, "the worker to exit")
    statuses = Counter(completion(two_workers.port) for _ in range(20))
    assert statuses == {200: 20}
    wait_until(lambda: len(workers_of(two_workers)) == 2 and victim.pid not in {w.pid for w in workers_of(two_workers)},
               15, "the worker to be started again")
    assert survivor.is_running()
    assert Counter(completion(two_workers.port) for _ in range(20)) == {200: 20}


def test_a_drain_waits_until_every_worker_routes_without_the_replica(two_workers: Daemon) -> None:
    # SPEC §7: out of the balancer, then drain. A worker that has not yet applied the table without the
    # replica could still send it a request, so the replica is not stopped until every worker has.
    frozen = workers_of(two_workers)[0]
    frozen.send_signal(signal.SIGSTOP)  # it cannot apply (or acknowledge) a table now
    try:
        two_workers.client.request("PATCH", "/v1/models/m", {"replicas": 2})
        leaving = wait_until(lambda: next((r for r in two_workers.show("m")["replicas"]
                                           if r["index"] == 2 and r["state"] == "stopping"), None), 10, "stopping")
        held = time.monotonic() + 1.0
        while time.monotonic() < held:  # held back by the frozen worker: its process stays up
            assert psutil.pid_exists(leaving["pid"]), "the replica was stopped before every worker let it go"
            time.sleep(0.05)
    finally:
        frozen.send_signal(signal.SIGCONT)
    wait_until(lambda: [r["index"] for r in two_workers.show("m")["replicas"]] == [0, 1], 10, "the drain to end")


def test_metrics_are_the_sum_over_workers(two_workers: Daemon) -> None:
    sent = 24
    for _ in range(sent):  # each on its own connection: the kernel spreads them over both workers
        assert completion(two_workers.port) == 200
    for _ in range(6):  # whichever worker answers the scrape, the figure is the whole
        total = sum(float(v) for v in re.findall(
            r'^gpud_proxy_requests_total\{code="200",model="m",replica="\d"\} (\S+)$', scrape(two_workers.port), re.M))
        assert total == sent


def test_no_worker_outlives_a_sigkilled_daemon(two_workers: Daemon) -> None:
    pids = [w.pid for w in workers_of(two_workers)]
    two_workers.stop(signal.SIGKILL)
    wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                               for p in pids), 10, "the workers to go")
    # A new life on the same state dir starts clean: its own workers, the saved model back.
    two_workers.start()
    shown = two_workers.wait_idle("m")
    assert shown["replicas_ready"] == 3 and completion(two_workers.port) == 200


def test_workers_setting(tmp_path: os.PathLike[str]) -> None:
    def workers(value: str | None = None, env: str | None = None) -> int:
        path = os.path.join(tmp_path, "gpud.toml")
        with open(path, "w") as fh:
            fh.write(f"[proxy]\nworkers = {value}\n" if value is not None else "")
        environ = {"HOME": str(tmp_path)} | ({"GPUD_PROXY_WORKERS": env} if env else {})
        return load_settings({"config": path}, environ).proxy.workers

    assert workers() == 1
    assert workers("3") == 3
    assert 1 <= workers('"auto"') == max(1, min(8, (os.cpu_count() or 2) // 2))
    assert workers("2", env="4") == 4  # the environment wins over the file
    for bad in ("0", "9", '"many"', "true"):
        with pytest.raises(InvalidInput, match="workers"):
            workers(bad)


def test_the_api_keys_reach_the_workers_but_no_command_line(make_daemon) -> None:  # type: ignore[no-untyped-def]
    key = "sk-not-for-ps-eyes"
    daemon = make_daemon(config=FAST_CONFIG + f'[proxy]\nworkers = 2\napi_keys = ["{key}"]\n').start()
    wait_until(lambda: len(workers_of(daemon)) == 2, 15, "two proxy workers")
    root = psutil.Process(daemon.proc.pid)
    for proc in [root, *root.children(recursive=True)]:
        assert key not in " ".join(proc.cmdline()), f"the API key is on the command line of pid {proc.pid}"

    def models(headers: dict[str, str]) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        try:
            conn.request("GET", "/v1/models", headers=headers)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    # Each worker has the key (SO_REUSEPORT spreads connections, so several tries reach both).
    assert Counter(models({}) for _ in range(10)) == {401: 10}
    assert Counter(models({"Authorization": f"Bearer {key}"}) for _ in range(10)) == {200: 10}
