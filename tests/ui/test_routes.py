"""What the dashboard passes to the control API, and how daemon data becomes page events (pure parts)."""

from __future__ import annotations

import json

import pytest

from gpud.exits import describe_exit
from gpud.ui.routes import control_path, decorate_models, decorate_show, model_changes, page_event, sse_frame
from gpud.ui.text import LineSplitter


@pytest.mark.parametrize(("method", "raw", "expected"), [
    ("GET", "/api/v1/status", "/v1/status"),
    ("GET", "/api/v1/gpus", "/v1/gpus"),
    ("GET", "/api/v1/models", "/v1/models"),
    ("POST", "/api/v1/models", "/v1/models"),
    ("GET", "/api/v1/models/demo", "/v1/models/demo"),
    ("PATCH", "/api/v1/models/Qwen%2FQwen2.5-7B", "/v1/models/Qwen%2FQwen2.5-7B"),  # stays encoded
    ("DELETE", "/api/v1/models/demo", "/v1/models/demo"),
    ("POST", "/api/v1/models/demo/restart", "/v1/models/demo/restart"),
    ("POST", "/api/v1/models/demo/unload", "/v1/models/demo/unload"),
    ("POST", "/api/v1/models/demo/load", "/v1/models/demo/load"),
    ("GET", "/api/v1/models?x=1", "/v1/models"),  # a query string is never passed on
])
def test_the_routes_the_page_uses_are_passed_through(method: str, raw: str, expected: str) -> None:
    assert control_path(method, raw) == expected


@pytest.mark.parametrize(("method", "raw"), [
    ("POST", "/api/v1/venvs/prune"),         # not offered by the page
    ("GET", "/api/v1/venvs"),
    ("POST", "/api/v1/plan"),
    ("PUT", "/api/v1/models/demo"),
    ("GET", "/api/v1/models/demo/logs"),     # logs go through /api/logs (tail only)
    ("POST", "/api/v1/models/demo/restart/x"),
    ("GET", "/api/v1/models/../status"),
    ("GET", "/api/v1/models/%2e%2e"),
    ("POST", "/api/v1/models/"),
    ("GET", "/v1/models"),                   # not under /api
    ("GET", "/api/v1/events"),               # the page's feed is /api/events
])
def test_anything_else_is_not_passed_on(method: str, raw: str) -> None:
    assert control_path(method, raw) is None


def test_last_exits_are_decoded_with_the_cli_phrases() -> None:
    show = {"name": "m", "replicas": [
        {"index": 0, "last_exit": {"code": None, "signal": "SIGKILL"}},
        {"index": 1, "last_exit": {"code": 137, "signal": None}},
        {"index": 2, "last_exit": None},
    ]}
    out = decorate_show(show)
    assert out["replicas"][0]["last_exit_text"] == describe_exit(None, "SIGKILL")
    assert "killed by SIGKILL" in out["replicas"][0]["last_exit_text"]
    assert out["replicas"][1]["last_exit_text"] == describe_exit(137, None)
    assert "last_exit_text" not in out["replicas"][2]
    assert "last_exit_text" not in show["replicas"][0]  # the input is not changed
    assert decorate_models({"models": [show]})["models"][0] == out
    assert decorate_show({"error": {"code": "invalid", "message": "x"}}) == {"error": {"code": "invalid", "message": "x"}}


def test_daemon_events_become_page_events() -> None:
    show = {"name": "m", "replicas": []}
    assert page_event({"type": "model", "name": "m", "model": show}) == ("model", show)
    assert page_event({"type": "removed", "name": "m"}) == ("removed", {"name": "m"})
    assert page_event({"type": "shutdown"}) is None
    assert page_event({"type": "changed", "name": "m"}) is None
    evicted = {"type": "evicted", "name": "a", "for": "b"}
    assert page_event(evicted) == ("notice", evicted)  # SPEC §12 events reach the activity list


def test_the_periodic_refresh_sends_only_what_changed() -> None:
    sent = {"a": {"name": "a", "inflight": 0}, "b": {"name": "b"}}
    changed, removed = model_changes(sent, [{"name": "a", "inflight": 2}, {"name": "c"}])
    assert changed == [{"name": "a", "inflight": 2}, {"name": "c"}]
    assert removed == ["b"]
    assert model_changes({"a": {"name": "a"}}, [{"name": "a"}]) == ([], [])


def test_an_sse_frame_is_one_data_line_whatever_the_text() -> None:
    frame = sse_frame("lines", ["a\nb", "c\r\nd"])
    assert frame.endswith(b"\n\n")
    head, data = frame.decode().rstrip("\n").split("\n")
    assert head == "event: lines" and json.loads(data.removeprefix("data: ")) == ["a\nb", "c\r\nd"]


def test_lines_are_split_across_chunks_and_cut_when_huge() -> None:
    splitter = LineSplitter(10)
    assert splitter.feed(b"one\ntw") == ["one"]
    assert splitter.feed(b"o\r\nthree\n") == ["two", "three"]
    assert splitter.feed(b"x" * 25 + b"\n") == ["x" * 10 + " … [15 more bytes]"]
    assert splitter.feed(b"tail") == [] and splitter.flush() == ["tail"]
    assert splitter.flush() == []


def test_a_runaway_line_is_held_in_bounded_memory() -> None:
    splitter = LineSplitter(100)
    for _ in range(1000):
        assert splitter.feed(b"y" * 10_000) == []
    assert len(splitter._head) <= 400
    (line,) = splitter.feed(b"\n")
    assert line.startswith("y" * 100 + " … [") and line.endswith(f"{10_000_000 - 100} more bytes]")
