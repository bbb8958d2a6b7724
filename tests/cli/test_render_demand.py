"""SPEC §12 in the CLI without a daemon: the new flags' checks, the list/show fields, progress lines."""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest

from gpud.cli import commands, parser, render, requests
from gpud.errors import InvalidInput

IDLE: dict[str, Any] = {
    "name": "qwen", "engine": "vllm", "state": "idle", "replicas_ready": 0, "replicas_desired": 2,
    "endpoint": "http://127.0.0.1:8000/v1", "replicas": [], "idle_timeout_sec": 900.0, "on_demand": True,
    "min_replicas": 2, "max_replicas": 4, "target_inflight": 8,
    "message": "The last load failed: exited with code 3.",
}


def test_start_sends_the_demand_fields_as_typed() -> None:
    ns = parser.parse(["model", "start", "m", "--engine", "sim", "--replicas", "2", "--idle-timeout", "15m",
                       "--on-demand", "--max-replicas", "4", "--target-inflight", "3"])
    body = requests.start_body(ns)
    assert (body["idle_timeout"], body["on_demand"], body["max_replicas"], body["target_inflight"]) == ("15m", True, 4, 3)
    plain = requests.start_body(parser.parse(["model", "start", "m", "--engine", "sim"]))
    assert not {"idle_timeout", "on_demand", "max_replicas", "target_inflight"} & set(plain)


@pytest.mark.parametrize("flags", [["--idle-timeout", "soon"], ["--max-replicas", "1", "--replicas", "3"],
                                   ["--target-inflight", "0"], ["--max-replicas", "x"]])
def test_bad_demand_flags_fail_before_anything_is_sent(flags: list[str]) -> None:
    with pytest.raises(InvalidInput):
        requests.start_body(parser.parse(["model", "start", "m", "--engine", "sim", *flags]))


def test_unload_and_load_commands_parse() -> None:
    for action in ("unload", "load"):
        ns = parser.parse(["model", action, "Org/m", "--no-wait", "--timeout", "5"])
        assert (ns.name, ns.no_wait, ns.timeout) == ("Org/m", True, "5")
        assert ns.func is getattr(commands, f"cmd_{action}")


def test_list_and_show_carry_the_demand_fields() -> None:
    # Made here, not at import: the whole suite runs for minutes between the two.
    now = float(int(time.time()))  # whole seconds: the ISO form holds them exactly
    ago = datetime.datetime.fromtimestamp(now - 125, datetime.timezone.utc).isoformat()
    shown_model = {**IDLE, "last_request_at": ago}
    listing = render.format_model_list({"models": [shown_model]}, now=now)
    assert listing.splitlines()[0].split() == ["NAME", "ENGINE", "STATE", "READY", "LAST", "REQUEST", "ENDPOINT"]
    assert "2m 5s ago" in listing
    shown = render.format_model_show(shown_model)
    for words in ("State:         idle", "Idle timeout:  15m", "On demand:     yes", "Scaling:       2-4 replicas",
                  "Last request:", "Note:          The last load failed"):
        assert words in shown, words


def test_progress_lines_for_the_demand_events() -> None:
    assert render.demand_event({"type": "evicted", "name": "old", "by": "big"}) == (
        "evicting old (idle, least recently used) to make room for big")
    assert render.demand_event({"type": "wake", "name": "m", "why": "load"}) == "m: waking (load)"
    assert render.demand_event({"type": "idle", "name": "m", "why": "timeout"}) == "m: idle (timeout)"
    assert render.demand_event({"type": "scaled", "name": "m", "from": 1, "to": 2, "why": "busy"}) == (
        "m: 1 → 2 replicas (busy)")
