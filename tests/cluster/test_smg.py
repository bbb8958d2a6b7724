"""End to end: two real gpud daemons on this machine (two ports) behind a real Shepherd Model Gateway (SPEC §16).

SMG is the `smg` wheel (`pip install 'gpud[cluster]'`; `python3 dev.py test` installs it where a wheel
exists). Everything binds to 127.0.0.1. Health probes run every second (the registration body's `health`,
from `[cluster]`), so a node's death shows within a few seconds.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import FAST_CONFIG, Daemon, wait_until

from gpud.cluster.workers import worker_url
from gpud.supervise.supervisor import free_port

SMG = shutil.which("smg", path=str(Path(sys.executable).parent)) or shutil.which("smg")
pytestmark = pytest.mark.skipif(
    SMG is None,
    reason="the Shepherd Model Gateway (smg) is not installed: pip install 'gpud[cluster]' (python3 dev.py test "
    "installs it where the platform has an smg wheel)",
)
SYNC_SEC = 1.0
SIM = ["--startup-s", "0", "--ttft-ms", "0", "--itl-ms", "0"]


class Gateway:
    """`smg launch` on 127.0.0.1 (data and metrics ports), round robin, with no workers to begin with."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port(set())
        self.metrics_port = free_port({self.port})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Gateway:
        assert SMG is not None
        log = open(self.root / "smg.log", "ab")  # noqa: SIM115 - the child holds it; closed with the process
        self.proc = subprocess.Popen(
            [SMG, "launch", "--host", "127.0.0.1", "--port", str(self.port), "--prometheus-host", "127.0.0.1",
             "--prometheus-port", str(self.metrics_port), "--policy", "round_robin", "--log-level", "warn",
             "--shutdown-grace-period-secs", "1"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(lambda: self._alive() and self.request("GET", "/health")[0] == 200, 20, "the gateway to listen")
        return self

    def _alive(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, (self.root / "smg.log").read_text()
        return True

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = raw.decode(errors="replace")
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, doc
        finally:
            conn.close()

    def workers(self, status: str | None = None) -> dict[str, str]:
        """URL → status of the gateway's workers (only those in `status`, when given)."""
        code, _, doc = self.request("GET", "/workers")
        assert code == 200, doc
        return {w["url"]: w["status"] for w in doc["workers"] if status is None or w["status"] == status}

    def chat(self, model: str) -> tuple[int, str | None]:
        """One chat completion through the gateway: its status and the X-Sim-Pid of the replica that answered."""
        code, headers, _ = self.request("POST", "/v1/chat/completions",
                                        {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                         "max_tokens": 2})
        return code, headers.get("x-sim-pid")


@pytest.fixture
def gateway(short_tmp: Path) -> Iterator[Gateway]:
    gw = Gateway(short_tmp).start()
    yield gw
    gw.kill()


@pytest.fixture
def nodes(make_daemon: Callable[..., Daemon], gateway: Gateway) -> Callable[[int], list[Daemon]]:
    """`nodes(n)`: n gpud daemons registered with the gateway (fast cluster timings), started side by side."""

    def make(n: int) -> list[Daemon]:
        made = [make_daemon() for _ in range(n)]
        for daemon in made:
            daemon.config_path.write_text(FAST_CONFIG + cluster_config(gateway, daemon))
            daemon.start(wait=False)
        for daemon in made:
            wait_until(lambda d=daemon: d._alive() and d.client.request("GET", "/v1/status"), 20, "a node to listen")
        return made

    return make


def cluster_config(gateway: Gateway, daemon: Daemon) -> str:
    return (f'[cluster]\ngateway = "{gateway.url}"\nadvertise = "{daemon.proxy_url}"\nsync_sec = {SYNC_SEC}\n'
            "health_interval_sec = 1\nhealth_timeout_sec = 1\nhealth_failures = 1\nderegister_timeout_sec = 5\n"
            '[cluster.labels]\nrack = "test"\n')


def start_sim(daemon: Daemon, name: str) -> None:
    """Start a sim model without waiting: the tests wait for its worker to be ready on the gateway."""
    daemon.start_model({"name": name, "model": name, "engine": "sim", "vram": "10GiB", "args": SIM}, settle=False)


def pids(daemon: Daemon, name: str) -> set[str]:
    return {str(r["pid"]) for r in daemon.show(name)["replicas"]}


def ready_on_gateway(gateway: Gateway, *urls: str) -> bool:
    ready = gateway.workers("ready")
    return all(u in ready for u in urls)


def test_requests_spread_over_the_nodes_that_have_the_model(gateway: Gateway, nodes: Callable[[int], list[Daemon]]) -> None:
    a, b = nodes(2)
    start_sim(a, "both")
    start_sim(b, "both")
    start_sim(a, "Org/only-a")
    urls = [worker_url(a.proxy_url, "both"), worker_url(b.proxy_url, "both"), worker_url(a.proxy_url, "Org/only-a")]
    wait_until(lambda: ready_on_gateway(gateway, *urls), 20, "three ready workers on the gateway")
    assert urls[2].endswith("/m/Org%2Fonly-a")
    served = Counter(gateway.chat("both") for _ in range(12))
    assert set(served) == {(200, p) for p in pids(a, "both") | pids(b, "both")}, served
    assert all(n >= 4 for n in served.values()), served  # round robin: both nodes get their share
    only = Counter(gateway.chat("Org/only-a") for _ in range(6))
    assert only == {(200, next(iter(pids(a, "Org/only-a")))): 6}
    code, _, body = gateway.request("GET", "/v1/models")
    assert code == 200 and {m["id"] for m in body["data"]} == {"both", "Org/only-a"}
    # The node's status catches up at its next sync (within sync_sec).
    expected = {("both", "ready"), ("Org/only-a", "ready")}
    status = wait_until(lambda: (s := a.client.request("GET", "/v1/status")["cluster"]) and
                        {(w["model"], w["status"]) for w in s["workers"]} == expected and s, 5, "the status")
    assert status["gateway"] == gateway.url and status["last_sync"]["ok"] is True
    shown = a.cli("status")
    assert shown.returncode == 0 and gateway.url in shown.stdout and "last sync ok" in shown.stdout
    assert "both (ready)" in shown.stdout


def test_stopping_a_model_on_one_node_moves_its_traffic_with_no_failed_request(
        gateway: Gateway, nodes: Callable[[int], list[Daemon]]) -> None:
    a, b = nodes(2)
    start_sim(a, "m")
    start_sim(b, "m")
    wait_until(lambda: ready_on_gateway(gateway, worker_url(a.proxy_url, "m"), worker_url(b.proxy_url, "m")), 20,
               "both workers ready")
    results: list[tuple[int, str | None]] = []
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            results.append(gateway.chat("m"))

    clients = [threading.Thread(target=load) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        wait_until(lambda: len(results) >= 20, 20, "traffic before the stop")
        stopped = a.cli("model", "stop", "m")
        assert stopped.returncode == 0, stopped.stderr
        a.wait_removed("m")
        after_stop = len(results)
        wait_until(lambda: len(results) >= after_stop + 20, 20, "traffic after the stop")
    finally:
        done.set()
        for t in clients:
            t.join(20)
    assert all(code == 200 for code, _ in results), Counter(code for code, _ in results)
    b_pids = pids(b, "m")
    assert all(pid in b_pids for _, pid in results[after_stop:])  # all of it on the other node now
    assert gateway.workers().get(worker_url(a.proxy_url, "m")) in (None, "draining")
    assert "removed worker" in a.log_text()
    # The gateway was told first: node a's proxy never had to turn a request away while its model stopped
    # (the gateway would have retried it elsewhere, but it should not have to).
    assert proxy_errors(a, "m") == {}


def proxy_errors(daemon: Daemon, model: str) -> dict[str, float]:
    """The node proxy's gpud_proxy_errors_total for `model`, by kind."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    errors: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gpud_proxy_errors_total{") and f'model="{model}"' in line:
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            errors[kind] = errors.get(kind, 0) + float(line.rsplit(" ", 1)[1])
    return {k: v for k, v in errors.items() if v}


def test_a_killed_node_drops_out_and_comes_back_registered(gateway: Gateway, nodes: Callable[[int], list[Daemon]]) -> None:
    a, b = nodes(2)
    start_sim(a, "m")
    start_sim(b, "m")
    url_a = worker_url(a.proxy_url, "m")
    wait_until(lambda: ready_on_gateway(gateway, url_a, worker_url(b.proxy_url, "m")), 20, "both workers ready")
    assert a.proc is not None
    a.proc.send_signal(signal.SIGKILL)  # no chance to deregister: the gateway's health check must notice
    a.stop()
    wait_until(lambda: gateway.workers().get(url_a) not in (None, "ready"), 15, "the gateway to mark node a down")
    b_pids = pids(b, "m")
    served = [gateway.chat("m") for _ in range(6)]
    assert all(code == 200 and pid in b_pids for code, pid in served), served
    wait_until(lambda: not a.replica_pids(), 10, "node a's replicas to go with it")
    a.start()  # restores "m" from its state and registers it again once ready
    wait_until(lambda: ready_on_gateway(gateway, url_a), 20, "node a back on the gateway")
    a_pids = pids(a, "m")
    served = [gateway.chat("m") for _ in range(8)]
    assert {pid for _, pid in served} & a_pids, served


def three_workers_on_two_nodes(gateway: Gateway, nodes: Callable[[int], list[Daemon]]
                               ) -> tuple[Daemon, Daemon, list[str]]:
    """Models x and y on node a, x on node b, all three ready on the gateway: (a, b, their worker URLs)."""
    a, b = nodes(2)
    start_sim(a, "x")
    start_sim(a, "y")
    start_sim(b, "x")
    urls = [worker_url(a.proxy_url, "x"), worker_url(a.proxy_url, "y"), worker_url(b.proxy_url, "x")]
    wait_until(lambda: ready_on_gateway(gateway, *urls), 20, "three ready workers")
    return a, b, urls


def test_a_restarted_gateway_gets_every_worker_back_within_sync_sec(
        gateway: Gateway, nodes: Callable[[int], list[Daemon]]) -> None:
    a, b, urls = three_workers_on_two_nodes(gateway, nodes)
    gateway.kill()
    gateway.start()  # same ports, no workers
    started = time.monotonic()
    wait_until(lambda: set(gateway.workers()) == set(urls), 10, "every worker back")
    assert time.monotonic() - started < SYNC_SEC + 6  # the next sync (plus registration's own probes)
    wait_until(lambda: ready_on_gateway(gateway, *urls), 10, "every worker ready")
    assert gateway.chat("y")[0] == 200


def test_the_gateway_down_never_disturbs_the_node(gateway: Gateway, nodes: Callable[[int], list[Daemon]]) -> None:
    [a] = nodes(1)
    start_sim(a, "m")
    wait_until(lambda: ready_on_gateway(gateway, worker_url(a.proxy_url, "m")), 20, "the worker ready")
    gateway.kill()
    # The node serves, starts and stops models as ever; the stop does not wait on the gateway.
    conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
    conn.request("POST", "/m/m/v1/chat/completions", body=json.dumps({"model": "m", "messages": []}),
                 headers={"Content-Type": "application/json"})
    assert conn.getresponse().status == 200
    conn.close()
    start_sim(a, "n")
    a.wait_idle("n")
    started = time.monotonic()
    assert a.cli("model", "stop", "n").returncode == 0
    a.wait_removed("n")
    assert time.monotonic() - started < 5  # not its deregister_timeout_sec (5 s) on top of the stop
    status = wait_until(lambda: (s := a.client.request("GET", "/v1/status")["cluster"]) and
                        s["last_sync"]["ok"] is False and s, 10, "the failed sync to show")
    assert "Cannot reach the gateway" in status["last_sync"]["error"]
    shown = a.cli("status")
    assert "last sync failed" in shown.stdout
    # One line for the gateway going away, however many attempts the backoff made.
    wait_until(lambda: a.log_text().count("Cannot reach the gateway") == 1, 5, "the one log line")
    gateway.start()
    wait_until(lambda: ready_on_gateway(gateway, worker_url(a.proxy_url, "m")), 20, "the worker back")
    assert a.log_text().count("Cannot reach the gateway") == 1
    assert a.stop() == 0


def test_sigterm_removes_every_worker_of_the_node_before_it_exits(
        gateway: Gateway, nodes: Callable[[int], list[Daemon]]) -> None:
    a, b, urls = three_workers_on_two_nodes(gateway, nodes)
    assert a.stop() == 0
    # Gone or draining the moment the daemon has exited; node b's worker untouched.
    listed = gateway.workers()
    assert all(listed.get(u) in (None, "draining") for u in urls[:2]) and listed[urls[2]] == "ready", listed


def test_an_idle_model_is_woken_by_a_request_through_the_gateway(
        gateway: Gateway, nodes: Callable[[int], list[Daemon]]) -> None:
    """An on-demand model is registered (and ready on the gateway) while idle: /m/NAME/health answers 200, so
    the gateway sends the first request, which wakes it on the node."""
    (a,) = nodes(1)
    a.start_model({"name": "lazy", "model": "lazy", "engine": "sim", "vram": "10GiB", "args": SIM,
                   "on_demand": True}, settle=False)
    url = worker_url(a.proxy_url, "lazy")
    wait_until(lambda: ready_on_gateway(gateway, url), 20, "the idle model's worker to be ready")
    assert a.show("lazy")["state"] == "idle" and a.replica_pids() == []
    code, pid = gateway.chat("lazy")
    assert code == 200 and pid is not None
    shown = a.show("lazy")
    assert shown["state"] == "running" and {str(r["pid"]) for r in shown["replicas"]} == {pid}
