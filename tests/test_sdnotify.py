"""sd_notify: gpud.sdnotify.Notifier on its own, then a real daemon talking to a socket that stands in for systemd."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import Daemon

from gpud.sdnotify import Notifier


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET: a datagram socket that keeps every message it got."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(address)
        self.messages: list[list[str]] = []  # one list of lines per datagram

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 20.0,
                 what: str = "a message") -> list[str]:
        """Receive until a datagram satisfies `predicate`; return it (fail the test at the deadline)."""
        for message in self.messages:
            if predicate(message):
                return message
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            message = data.decode().split("\n")
            self.messages.append(message)
            if predicate(message):
                return message
        raise AssertionError(f"no {what} within {timeout} s; got {self.messages}")

    def drain(self) -> None:
        """Take in what is already queued (e.g. after the daemon exited)."""
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.append(self.sock.recv(65536).decode().split("\n"))
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def lines(self) -> list[str]:
        return [line for message in self.messages for line in message]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(short_tmp: Path) -> Iterator[tuple[FakeSystemd, str]]:
    path = str(short_tmp / "notify.sock")
    fake = FakeSystemd(path)
    yield fake, path
    fake.close()


@pytest.fixture
def abstract_systemd() -> Iterator[tuple[FakeSystemd, str]]:
    name = f"gpud-test-{uuid.uuid4().hex}"
    fake = FakeSystemd("\0" + name)
    yield fake, "@" + name
    fake.close()


# ---- Notifier, on its own -------------------------------------------------------------------------------

def test_no_notify_socket_means_no_systemd_to_tell() -> None:
    notifier = Notifier({})
    assert notifier.address is None and notifier.watchdog_sec is None
    assert notifier.notify("READY=1") is False
    notifier.close()


def test_a_path_address_receives_one_datagram_per_notify(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.notify("READY=1", "STATUS=0 models") is True
    assert notifier.notify("WATCHDOG=1") is True
    notifier.close()
    assert fake.wait_for(lambda m: m[0] == "READY=1") == ["READY=1", "STATUS=0 models"]
    assert fake.wait_for(lambda m: m[0] == "WATCHDOG=1") == ["WATCHDOG=1"]


def test_an_at_address_is_in_the_abstract_namespace(abstract_systemd: tuple[FakeSystemd, str]) -> None:
    fake, address = abstract_systemd
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.address == "\0" + address[1:]
    assert notifier.notify("READY=1")
    notifier.close()
    assert fake.wait_for(lambda m: m == ["READY=1"])


def test_nobody_listening_is_reported_not_raised(short_tmp: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(short_tmp / "nobody.sock")})
    assert notifier.notify("READY=1") is False
    notifier.close()


@pytest.mark.parametrize(("environ", "expected"), [
    ({"WATCHDOG_USEC": "400000"}, 0.4),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": ""}, None),
    ({}, None),
])
def test_watchdog_settings(environ: dict[str, str], expected: float | None) -> None:
    assert Notifier({"NOTIFY_SOCKET": "/run/systemd/notify", **environ}).watchdog_sec == expected


# ---- a real daemon ------------------------------------------------------------------------------------------

def _status(message: list[str]) -> str | None:
    return next((line[len("STATUS="):] for line in message if line.startswith("STATUS=")), None)


def test_ready_comes_once_the_control_socket_and_the_proxy_answer(
    make_daemon: Callable[..., Daemon], systemd: tuple[FakeSystemd, str]
) -> None:
    fake, path = systemd
    daemon = make_daemon(env={"NOTIFY_SOCKET": path})
    daemon.start(wait=False)
    ready = fake.wait_for(lambda m: "READY=1" in m, what="READY=1")
    # Right at READY=1, without any retry: systemd starts the units ordered after gpud at this moment.
    assert daemon.client.request("GET", "/v1/status")["version"]
    with urllib.request.urlopen(f"{daemon.proxy_url}/health", timeout=5) as resp:
        assert resp.status == 200
    assert daemon.proc is not None and f"MAINPID={daemon.proc.pid}" in ready
    assert _status(ready) == "0 models, 0/0 replicas ready"
    assert sum("READY=1" in m for m in fake.messages) == 1

    # STATUS= follows the replica counts.
    daemon.start_model({"model": "demo", "engine": "sim", "replicas": 2, "vram": "1GiB",
                        "args": ["--startup-s", "0"]}, settle=False)
    fake.wait_for(lambda m: _status(m) == "1 models, 2/2 replicas ready", what="STATUS= with 2/2 ready")

    assert daemon.stop() == 0
    fake.drain()
    lines = fake.lines()
    assert "STOPPING=1" in lines and lines.index("STOPPING=1") > lines.index("READY=1")
    assert sum(line == "READY=1" for line in lines) == 1
    assert "WATCHDOG=1" not in lines  # no WATCHDOG_USEC: systemd did not ask for pings


def test_watchdog_pings_keep_coming_when_systemd_asks_for_them(
    make_daemon: Callable[..., Daemon], abstract_systemd: tuple[FakeSystemd, str]
) -> None:
    fake, address = abstract_systemd  # systemd itself uses an abstract or /run/systemd/notify address
    # 0.4 s watchdog: gpud pings at half of it. Only a lower bound is checked: a slow machine may ping late.
    daemon = make_daemon(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}).start()
    fake.wait_for(lambda m: "READY=1" in m, what="READY=1")
    fake.wait_for(lambda m: sum("WATCHDOG=1" in x for x in fake.messages) >= 3, what="3 WATCHDOG=1 pings")
    assert daemon.stop() == 0
    fake.drain()
    assert "STOPPING=1" in fake.lines()

