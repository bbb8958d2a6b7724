"""Routing policies (SPEC §13) through a real daemon and sim replicas: sessions stick, overload moves a key,
a dead replica's keys move, prefixes stick and spread, least-conn stays the default, outcomes are counted."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
from collections import Counter
from typing import Any

import pytest
from helpers import Daemon, wait_until

from gpud.errors import InvalidInput

SYSTEM = "You are a careful assistant. " * 40  # over 1 KiB: several 256-character blocks


def post(daemon: Daemon, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, int]:
    """(status, replica) of one completion on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=15)
    try:
        conn.request("POST", "/v1/chat/completions" if "messages" in body else "/v1/completions",
                     json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        response.read()
        return response.status, int(response.getheader("X-Gpud-Replica", "-1"))
    finally:
        conn.close()


def open_stream(daemon: Daemon, headers: dict[str, str]) -> tuple[socket.socket, int]:
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 100_000, "stream": True}).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s"
                 b"Content-Length: %d\r\n\r\n%s" % (extra, len(body), body))
    seen = b""
    while b"data: " not in seen:
        seen += sock.recv(65536)
    match = re.search(rb"(?i)x-gpud-replica: (\d+)", seen)
    assert match
    return sock, int(match.group(1))


def routes(daemon: Daemon) -> dict[tuple[str, str], float]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {(policy, outcome): float(v) for policy, outcome, v in re.findall(
        r'^gpud_route_total\{model="m",outcome="(\w+)",policy="([\w-]+)"\} (\S+)$', text, re.M)
        for policy, outcome in [(outcome, policy)]}


def start(daemon: Daemon, routing: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "engine": "sim", "replicas": 3, "vram": "1GiB",
                            "args": ["--startup-s", "0", "--itl-ms", "20"]}
    if routing:
        body["routing"] = routing
    return daemon.start_model(body)


def test_least_conn_stays_the_default_and_ignores_session_keys(daemon: Daemon) -> None:
    shown = start(daemon, None)
    assert shown["routing"] == "least-conn"
    seen = [post(daemon, {"model": "m", "prompt": "x", "max_tokens": 1}, {"X-Session-ID": "a"})[1] for _ in range(6)]
    assert seen == [0, 1, 2, 0, 1, 2]
    assert routes(daemon) == {}  # least-conn models make no routing decisions worth counting


def test_a_session_sticks_moves_when_overloaded_and_follows(daemon: Daemon) -> None:
    assert start(daemon, "session")["routing"] == "session"
    alice = {"X-Session-ID": "alice"}
    first = post(daemon, {"model": "m", "prompt": "x", "max_tokens": 1}, alice)[1]
    assert {post(daemon, {"model": "m", "prompt": "x", "max_tokens": 1}, alice)[1] for _ in range(5)} == {first}
    bob = post(daemon, {"model": "m", "prompt": "x", "max_tokens": 1, "user": "bob"})[1]  # the body's user
    assert {post(daemon, {"model": "m", "prompt": "x", "max_tokens": 1, "user": "bob"})[1] for _ in range(3)} == {bob}
    # Streams of alice pile up on her replica until it is overloaded (above ceil(1.25 × mean) + 1): 3 stick,
    # the 5th request (4 in flight there, none elsewhere: limit 3) moves, and alice follows it.
    streams = [open_stream(daemon, alice) for _ in range(4)]
    try:
        assert [replica for _, replica in streams] == [first] * 4
        status, moved = post(daemon, {"model": "m", "prompt": "x", "max_tokens": 1}, alice)
        assert status == 200 and moved != first
    finally:
        for sock, _ in streams:
            sock.close()
    wait_until(lambda: all(r["inflight"] == 0 for r in daemon.show("m")["replicas"]), 10, "the streams to end")
    assert post(daemon, {"model": "m", "prompt": "x", "max_tokens": 1}, alice)[1] == moved
    counted = routes(daemon)
    assert counted[("session", "miss")] == 2 and counted[("session", "overflow")] == 1
    assert counted[("session", "hit")] >= 13


def test_a_dead_replica_costs_its_sessions_nothing_and_they_move(daemon: Daemon) -> None:
    start(daemon, "session")
    key = {"X-Session-ID": "carol"}
    bound = post(daemon, {"model": "m", "prompt": "x", "max_tokens": 1}, key)[1]
    pid = next(r["pid"] for r in daemon.show("m")["replicas"] if r["index"] == bound)
    os.kill(pid, signal.SIGKILL)
    status, replica = post(daemon, {"model": "m", "prompt": "x", "max_tokens": 1}, key)
    assert status == 200 and replica != bound  # retried elsewhere before any byte, or routed around it
    assert {post(daemon, {"model": "m", "prompt": "x", "max_tokens": 1}, key)[1] for _ in range(4)} == {replica}


def test_prefixes_stick_per_conversation_and_conversations_spread(daemon: Daemon) -> None:
    start(daemon, "prefix")
    where: dict[int, set[int]] = {}
    for turn in range(4):
        for conv in range(6):
            # Each conversation has its own system prompt: its first request matches nothing (least connections).
            history = [{"role": "system", "content": f"You help user {conv}. " + SYSTEM}]
            for t in range(turn + 1):
                history += [{"role": "user", "content": f"question {t} of conversation {conv} " * 12},
                            {"role": "assistant", "content": "an answer " * 30}]
            status, replica = post(daemon, {"model": "m", "messages": history[:-1], "max_tokens": 1})
            assert status == 200
            where.setdefault(conv, set()).add(replica)
    assert all(len(replicas) == 1 for replicas in where.values()), where  # each conversation stays put
    assert set(Counter(next(iter(r)) for r in where.values()).values()) == {2}  # and they spread 2/2/2
    counted = routes(daemon)
    assert counted[("prefix", "hit")] == 18 and counted[("prefix", "miss")] == 6
    # A new conversation that shares a known system prompt goes where that prompt was served last (SPEC §13:
    # the longest run of leading blocks; the load bound spreads them when that replica gets busy).
    shared = [{"role": "system", "content": "You help user 5. " + SYSTEM}, {"role": "user", "content": "new"}]
    assert post(daemon, {"model": "m", "messages": shared, "max_tokens": 1})[1] == next(iter(where[5]))
    # A body that is not JSON, or has no prompt, is still forwarded: by least connections.
    assert post(daemon, {"model": "m", "max_tokens": 1})[0] == 200


def test_routing_is_validated_and_shown(daemon: Daemon) -> None:
    with pytest.raises(InvalidInput, match="Unknown routing 'bogus'"):
        daemon.client.request("POST", "/v1/models", {"model": "m", "engine": "sim", "routing": "bogus"})
    out = daemon.cli("model", "start", "m", "--engine", "sim", "--vram", "1GiB", "--routing", "bogus")
    assert out.returncode == 2 and "invalid choice: 'bogus'" in out.stderr
    out = daemon.cli("model", "start", "m", "--engine", "sim", "--vram", "1GiB", "--routing", "prefix")
    assert out.returncode == 0, out.stderr
    assert "Routing:   prefix" in daemon.cli("model", "show", "m").stdout
